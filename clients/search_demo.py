"""Semantic search demo: rank a small built-in corpus by cosine similarity to a query.

    python -m clients.search_demo "how do I cook pasta?"
    python -m clients.search_demo -i http -u 127.0.0.1:8000 -k 3 "a pet that purrs"
"""
from __future__ import annotations

import argparse

import numpy as np

from clients.common import add_common_args, run_cli
from clients.embed import DEFAULT_MODEL, embed

CORPUS = (
    "Boil the spaghetti in salted water for nine minutes, then drain it.",
    "The cat curled up on the sofa and purred all afternoon.",
    "Our quarterly revenue grew by twelve percent compared to last year.",
    "The train to Berlin leaves from platform four at 8:15.",
    "Regular exercise lowers blood pressure and improves sleep.",
    "The new smartphone has a larger battery and a faster processor.",
    "Heavy rain and strong winds are expected over the weekend.",
    "She practiced the violin every evening before the concert.",
    "Python lists are dynamic arrays; appending is amortized constant time.",
    "The museum exhibits paintings from the Dutch Golden Age.",
)


def search(query: str, corpus: tuple[str, ...] | list[str] = CORPUS, k: int = 5, url: str | None = None,
           protocol: str = "grpc", model: str = DEFAULT_MODEL) -> list[tuple[float, str]]:
    """Top-k (cosine, text) pairs, best first. Embeddings are unit length, so cosine is a dot product."""
    emb = embed([query, *corpus], url=url, protocol=protocol, model=model)
    scores = emb[1:] @ emb[0]  # [len(corpus)]
    order = np.argsort(-scores)[:k]
    return [(float(scores[i]), corpus[i]) for i in order]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.add_argument("-k", type=int, default=5, help="results to show")
    p.add_argument("query", nargs="?", default="how do I cook pasta?")
    a = p.parse_args(argv)
    print(f"query: {a.query!r}")
    for score, text in search(a.query, CORPUS, a.k, a.url, a.protocol, a.model):
        print(f"  {score:.3f}  {text}")
    return 0


if __name__ == "__main__":
    run_cli(main)

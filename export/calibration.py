"""Varied sentences generated in code (no downloads): int8 calibration and the int8 accuracy report.

Templates x vocabulary x length, with some non-ASCII text, so that calibration sees short and long,
plain and unusual token sequences. Deterministic for a seed; calibration and the accuracy report use
different seeds so the report is not measured on the calibration sentences.
"""
from __future__ import annotations

import random

SUBJECTS = (
    "the cat", "a data scientist", "my neighbour", "the new GPU cluster", "our support team",
    "the city council", "a small startup", "the orchestra", "this recipe", "the spacecraft",
    "an old lighthouse keeper", "the football club", "the compiler", "a migrating bird", "the bank",
)
VERBS = (
    "explains", "ignores", "repairs", "celebrates", "measures", "predicts", "questions",
    "delivers", "describes", "improves", "cancels", "photographs", "translates", "reviews",
)
OBJECTS = (
    "the quarterly report", "a broken bicycle", "the weather forecast", "an unexpected invoice",
    "the latency of the service", "a sourdough starter", "the migration plan", "a jazz standard",
    "the election results", "a list of 42 open issues", "the protein structure", "a lost passport",
    "the embedding model", "a mountain trail", "the tax return",
)
ADVERBIALS = (
    "", "today", "before the deadline", "with great care", "in under 5 minutes", "for the third time",
    "despite the rain", "without telling anyone", "at 3 a.m.", "on a tiny laptop",
)
QUESTIONS = (
    "How do I {verb} {obj}?", "Why does {subj} always {verb_base} {obj}?", "Can {subj} {verb_base} {obj} {adv}?",
    "What is the fastest way to {verb_base} {obj}?",
)
FRAGMENTS = ("ok", "thanks!", "error 404", "price: $19.99", "see you tomorrow", "N/A", "lol", "v2.51.0")
NON_ASCII = (
    "Der Bäcker verkauft frische Brötchen.", "¿Dónde está la estación de tren?", "Ça coûte 12 €, merci.",
    "Москва — столица России.", "東京は日本の首都です。", "北京欢迎你", "Γειά σου κόσμε", "naïve café résumé",
    "Emoji test 😀🚀 done", "İstanbul'da hava güzel.", "שלום עולם", "مرحبا بالعالم",
)


def _base(verb: str) -> str:
    return verb[:-2] if verb.endswith("es") and verb[-3] in "sxh" else verb[:-1]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    subj, verb, obj, adv = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ADVERBIALS)
    if kind < 0.45:  # plain statement
        return f"{subj.capitalize()} {verb} {obj} {adv}".strip() + "."
    if kind < 0.6:  # question
        return rng.choice(QUESTIONS).format(subj=subj, verb=verb, verb_base=_base(verb), obj=obj, adv=adv)
    if kind < 0.7:  # short fragment
        return rng.choice(FRAGMENTS)
    if kind < 0.8:  # non-ASCII
        return rng.choice(NON_ASCII)
    # long: several clauses, often past the 128-token truncation length
    n = rng.randint(3, 14)
    clauses = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ADVERBIALS)}".strip()
               for _ in range(n)]
    return (", and then ".join(clauses) + ".").capitalize()


def sentences(n: int, seed: int = 0) -> list[str]:
    """n varied sentences, deterministic for a seed."""
    assert n > 0, n
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]


CALIBRATION_SEED = 1
REPORT_SEED = 2

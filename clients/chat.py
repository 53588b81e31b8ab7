"""Interactive chat over gRPC streaming, using the model's chat template when it has one.

    python -m clients.chat                       # tiny_llama on 127.0.0.1:8001
    python -m clients.chat -u host:8001 -m qwen --checkpoint model_repository/qwen/1/checkpoint --max-tokens 256

The conversation is rendered client-side with the tokenizer's chat template (from --checkpoint,
default: the served model's checkpoint in this repository) and sent as text_input; without a
template, turns are joined as "role: text" lines. Commands: /reset clears the history, /quit exits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.common import add_common_args, run_cli
from clients.llm_stream import DEFAULT_MODEL, generate
from serve.paths import MODEL_REPOSITORY


def load_template(checkpoint: Path):
    """The tokenizer if it has a chat template, else None."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):
        return None
    return tok if tok.chat_template else None


def render(messages: list[dict], tokenizer) -> str:
    if tokenizer is not None:
        # The server tokenizes text_input again (adding BOS): drop a BOS the template put first.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint", type=Path, help="tokenizer directory (default: the model's checkpoint here)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    a = ap.parse_args(argv)
    tokenizer = load_template(a.checkpoint or MODEL_REPOSITORY / a.model / "1" / "checkpoint")
    print(f"chat with {a.model} ({'chat template' if tokenizer else 'plain role: text prompt'}); /reset, /quit",
          file=sys.stderr)
    history = [{"role": "system", "content": a.system}] if a.system else []

    def body():
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                return 0
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                history[:] = history[:1] if a.system else []
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            r = generate(render(history, tokenizer), a.url, a.model, verbose=a.verbose,
                         on_chunk=lambda t: print(t, end="", flush=True), max_tokens=a.max_tokens,
                         temperature=a.temperature, top_p=a.top_p)
            print()
            if r.error:
                print(f"error: {r.error}", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": r.text})

    run_cli(body)
    return 0


if __name__ == "__main__":
    main()

"""llm/text_stream.py: incremental detokenization against tokenizer.decode, with byte-level BPE (the
random checkpoints' tokenizer) and a byte-fallback SentencePiece-style BPE (Llama 2, TinyLlama)."""
from __future__ import annotations

import random

import pytest

from llm.text_stream import MAX_PENDING_REPLACEMENTS, Detokenizer, TextStream, held_back


def byte_level():
    from export.random_llm import SHAPES, build_tokenizer

    return build_tokenizer(SHAPES["tiny"]["vocab_size"])


def byte_fallback():
    """Llama 2's decoding pipeline (▁ -> space, <0xNN> byte tokens, strip the leading space) over a
    small vocabulary: the 256 byte tokens plus a few pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁", "▁hello", "▁world", "ok", "▁the", "“", "”", "é"]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_ids(tok, data: bytes) -> list[int]:
    """The token ids of single bytes (byte-level: its alphabet; byte fallback: <0xNN>)."""
    if "<0x00>" in tok.get_vocab():
        return [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]
    # GPT-2's byte -> printable character table (what ByteLevel pre-tokenization writes).
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in shown]
    alphabet = {**{b: chr(b) for b in shown}, **{b: chr(256 + i) for i, b in enumerate(hidden)}}
    return [tok.convert_tokens_to_ids(alphabet[b]) for b in data]


def words(tok, text: str) -> list[int]:
    """Token ids of whole words (the byte-fallback vocabulary has no merges: its word pieces by id)."""
    if "<0x00>" in tok.get_vocab():
        return [tok.convert_tokens_to_ids("▁" + w) for w in text.split()]
    return tok.encode(text, add_special_tokens=False)


def detokenize(tok, ids: list[int], groups: random.Random | None = None) -> tuple[list[str], str]:
    """One token at a time, or (groups) extend() over random groups of 1-9 tokens, as a stream
    without stop strings does between responses."""
    d = Detokenizer(tok)
    if groups is None:
        pieces = [d.extend((t,)) for t in ids]
    else:
        pieces, i = [], 0
        while i < len(ids):
            k = groups.randrange(1, 10)
            pieces.append(d.extend(ids[i:i + k]))
            i += k
    return pieces, d.flush()


TOKENIZERS = {"byte_level": byte_level, "byte_fallback": byte_fallback}


@pytest.mark.parametrize("grouped", [False, True])
def test_pieces_plus_flush_equal_decode_for_random_ids_byte_level(grouped):
    tok = byte_level()
    text_ids = tok.encode("hello world, the “ok” é 🙂 中文", add_special_tokens=False)
    raw = byte_ids(tok, bytes(range(0x80, 0x100)))  # bytes that are never complete characters alone
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(text_ids + raw + [rng.randrange(len(tok))]) for _ in range(rng.randrange(1, 40))]
        pieces, rest = detokenize(tok, ids, random.Random(len(ids)) if grouped else None)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("grouped", [False, True])
def test_pieces_plus_flush_equal_decode_byte_fallback(grouped):
    """Runs of byte tokens end at a word: transformers' ByteFallback decodes a run that is not valid
    UTF-8 as a whole to one U+FFFD per byte, valid characters in it included, which no streaming
    detokenizer can know before the run ends (a character goes out as soon as it is complete)."""
    tok = byte_fallback()
    units = [[i] for i in words(tok, "hello world the") + tok.convert_tokens_to_ids(["ok", "“", "”", "é"])]
    units += [byte_ids(tok, c.encode()) for c in "“é🙂中"] + [byte_ids(tok, b"\xff" * k) for k in (1, 2, 5)]
    rng = random.Random(0)
    for _ in range(300):
        ids = []
        for _ in range(rng.randrange(1, 12)):
            ids += rng.choice(units) + words(tok, "the")
        pieces, rest = detokenize(tok, ids, random.Random(len(ids)) if grouped else None)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_character_split_over_byte_tokens_is_held_until_complete(name):
    tok = TOKENIZERS[name]()
    hello = words(tok, "hello")
    pieces, rest = detokenize(tok, hello + byte_ids(tok, "“".encode()) + hello)
    assert pieces[len(hello):len(hello) + 3] == ["", "", "“"]
    assert "".join(pieces) == tok.decode(hello + byte_ids(tok, "“".encode()) + hello) and rest == ""
    assert "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_run_of_invalid_bytes_does_not_hold_back_the_text(name):
    """A model emitting invalid UTF-8 over and over (random weights do): each token's text goes out
    at most MAX_PENDING_REPLACEMENTS characters late, not at the end of the request."""
    tok = TOKENIZERS[name]()
    hello = words(tok, "hello")
    run = byte_ids(tok, b"\xe2" * 20)
    pieces, rest = detokenize(tok, hello + run)
    sent = "".join(pieces)
    assert sent.startswith("hello") and sent.count("\ufffd") >= 20 - MAX_PENDING_REPLACEMENTS
    assert all(pieces[len(hello) + MAX_PENDING_REPLACEMENTS:])  # from then on, every token's text goes out
    assert sent + rest == tok.decode(hello + run, skip_special_tokens=True)


def test_first_response_goes_out_despite_invalid_bytes():
    """TextStream (stream_interval 8): the first response carries text within a few tokens."""
    tok = byte_level()
    stream = TextStream(tok, (), 8)
    firsts = []
    for i, t in enumerate(byte_ids(tok, b"\xe2" * 12)):
        stream.push(t, check_stops=False)
        if stream.take() is not None:
            firsts.append(i)
    assert firsts and firsts[0] == MAX_PENDING_REPLACEMENTS


class CountingTokenizer:
    """A fast tokenizer whose Rust decode calls are counted."""

    def __init__(self, tok):
        self.calls = 0
        inner = tok._tokenizer

        class Backend:
            def decode(_, ids, skip):
                self.calls += 1
                return inner.decode(ids, skip)
        self._tokenizer = Backend()


@pytest.mark.parametrize("stops", [(), ("zzz",)])
def test_a_stream_detokenizes_once_per_response_unless_it_has_stop_strings(stops):
    """stream_interval 8, 64 tokens: without stop strings the text is decoded when a response goes
    out (two tokenizer calls each), not per token; with stop strings every token is checked. The
    text is the same either way."""
    tok = byte_level()
    ids = words(tok, " ".join(["hello world the"] * 22))[:64]
    counting = CountingTokenizer(tok)
    stream, sent = TextStream(counting, stops, 8), []
    for t in ids:
        assert not stream.push(t, check_stops=True)
        if (text := stream.take()) is not None:
            sent.append(text)
    sent.append(stream.rest(flush=True))
    assert "".join(sent) == tok.decode(ids, skip_special_tokens=True)
    # Responses: the first token's, one per 8 tokens after it (7 of them), the final one.
    assert len(sent) == 9 and sent[-1]  # the last 7 tokens in the final response
    # Two decodes per detokenization (the window, then the text before the next window), plus the
    # final flush: per token 2 * 64 + 1; without stop strings once per response, 2 * 9 + 1.
    assert counting.calls == (2 * 64 + 1 if stops else 2 * 9 + 1)


def test_held_back_prefix_of_stop_word():
    assert held_back("abc", ("cde",)) == 1
    assert held_back("abcd", ("cde", "bcdx")) == 3
    assert held_back("abc", ("xyz",)) == 0
    assert held_back("abc", ()) == 0

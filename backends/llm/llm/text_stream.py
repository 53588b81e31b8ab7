"""A request's output text: incremental detokenization, stop strings, hold-back, coalescing.

`TextStream.push(token)` adds one generated token and reports a stop-string hit (the text is then cut
just before it); `take()` returns the text to send now: held back while it may still become a stop
string, and coalesced to one response per `interval` tokens (the first response goes out as soon as
there is text: time to first token). `rest()` is the final response's text.

Tokens are detokenized only when their text is needed: at each stop-string check (per token, while
the request has stop strings), when a response goes out, and at the finish. A streamed request
without stop strings costs two tokenizer calls per response instead of two per token, on the
engine's thread (the host work of a step at 64 streams).
"""
from __future__ import annotations


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop word (not sent yet)."""
    best = 0
    for w in stops:
        for k in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:k]):
                best = k
                break
    return best


# A character not complete yet decodes to at most 3 U+FFFD: one per byte with byte-fallback
# tokenizers (SentencePiece <0xNN> tokens), one in all with byte-level BPE (lossy UTF-8), and a UTF-8
# character has at most 3 bytes before its last. Replacement characters before those are final.
MAX_PENDING_REPLACEMENTS = 3


class Detokenizer:
    """Incremental detokenization: the new text of each group of tokens, so that the pieces plus
    flush() equal tokenizer.decode(all ids, skip_special_tokens=True). Each group decodes the window
    of ids since the last complete text (one Rust call with a fast tokenizer). Only what may still change is held
    back: at most MAX_PENDING_REPLACEMENTS trailing U+FFFD. (Holding back all text while it ends in
    U+FFFD, as tokenizers' DecodeStream does, withholds every later token's text for good once a
    model emits a run of invalid UTF-8 bytes: seen with random weights, a whole request's text
    arrived in its final response.)"""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust core: no Python overhead
        self.decode = backend.decode if backend is not None else tokenizer.decode  # (ids, skip_special_tokens)
        self.ids: list[int] = []
        self.emitted = 0  # chars returned so far
        self.prefix = 0  # the window: ids[prefix:read] decode to `before`, returned already
        self.read = 0
        self.before = ""
        self.partial = 0  # chars of the window's text after `before` returned already (before U+FFFD)

    def extend(self, token_ids) -> str:
        """The new text of one or more tokens (one window decode for all of them)."""
        ids = self.ids
        ids.extend(token_ids)
        new = self.decode(ids[self.prefix :], True)[len(self.before) + self.partial :]
        if not new:
            return ""
        if new[-1] == "\ufffd":  # maybe an incomplete character: keep the window, return what is final
            pending = len(new) - len(new.rstrip("\ufffd"))
            piece = new[: len(new) - min(pending, MAX_PENDING_REPLACEMENTS)]
            self.partial += len(piece)
        else:  # complete: the next window starts after this text
            piece = new
            self.prefix, self.read = self.read, len(ids)
            self.before, self.partial = self.decode(ids[self.prefix : self.read], True), 0
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end), once, at the finish."""
        rest = self.decode(self.ids, True)[self.emitted :]
        self.emitted += len(rest)
        return rest


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...], interval: int, prefix: str = ""):
        self.detok = Detokenizer(tokenizer)
        self.stops = stops
        self.interval = interval
        self.text = ""  # detokenized output so far
        self.sent = 0  # chars of self.text already handed out
        self.prefix = prefix  # echoed prompt: starts the first response
        self.unsent_tokens = 0
        self.started = False  # a response was handed out
        self.pending: list[int] = []  # tokens pushed but not detokenized yet

    def _detokenize(self) -> None:
        if self.pending:
            piece = self.detok.extend(self.pending)
            self.pending.clear()
            if piece:
                self.text += piece

    def push(self, token_id: int, check_stops: bool) -> bool:
        """Add a token. True when a stop string appeared (text cut before it)."""
        self.unsent_tokens += 1
        self.pending.append(token_id)
        if self.stops and check_stops:
            self._detokenize()
            # A stop word may span tokens: search the text not yet sent plus a margin.
            lo = max(0, self.sent - max(len(w) for w in self.stops))
            hits = [i for i in (self.text.find(w, lo) for w in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return True
        return False

    def take(self) -> str | None:
        """Text for a streamed response now, or None (coalescing, or nothing new to send)."""
        if self.unsent_tokens < self.interval and self.started:
            return None
        self._detokenize()
        end = len(self.text) - (held_back(self.text, self.stops) if self.stops else 0)
        if end <= self.sent and not self.prefix:
            return None
        out = self.prefix + self.text[self.sent : end]
        self.prefix, self.sent, self.unsent_tokens, self.started = "", end, 0, True
        return out

    def rest(self, flush: bool) -> str:
        """The final response's text: everything not sent yet (flush: plus held-back characters)."""
        self._detokenize()
        if flush:
            self.text += self.detok.flush()
        out = self.prefix + self.text[self.sent :]
        self.prefix, self.sent = "", len(self.text)
        return out

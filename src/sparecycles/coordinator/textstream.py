"""Token ids to text, incrementally, with stop strings: the coordinator's side of streaming.

The coordinator decodes every job's output itself with the model's tokenizer, so the text a
client sees and the tokens it is charged for come from one place, whatever node produced them.
Decoding is incremental (constant work per token, the prefix/read-offset method used by
text-generation-inference and vLLM) and holds back text that could still become a stop string
or is an incomplete UTF-8 sequence.

A byte-level BPE tokenizer (GPT-2's, Llama 3's, Qwen's, SmolLM2's) that ``decoder_of`` calls
directly is stepped by the Rust implementation of the same method instead
(``tokenizers.decoders.DecodeStream``: one call a token instead of two decodes and the slicing
around them, ~2.8 us a token against ~0.6 here; docs/benchmarks.md, issue 19, fourth pass). The
two can differ only where the text of the tokens read does not begin with the text of the
tokens before them, which byte-level decoding never gives (its text is the UTF-8 reading of the
tokens' bytes one after the other); should a step fail there all the same, the stream replays
its tokens into the Python method and goes on with it. Same text, same chunks
(tests/unit/test_textstream.py compares them token by token).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from tokenizers import decoders

# tokenizers >= 0.21; with an older one, the Python method alone
_DecodeStream: Any = getattr(decoders, "DecodeStream", None)

_INCOMPLETE = "\ufffd"  # what a tokenizer yields for a partial multi-byte character


def _direct_backend(tokenizer: Any) -> Any | None:
    """The Rust tokenizer behind a fast tokenizer that does no clean-up of spaces (whose
    ``decode`` is then exactly the backend's), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return backend
    return None


def decoder_of(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` as ``tokenizer.decode(ids, skip_special_tokens=True)`` gives it. A fast
    (Rust) tokenizer that does no clean-up of spaces is called directly: the same text, without
    transformers' Python layer around it (~28 us against ~5 us a call here, and the stream makes
    two a token; docs/benchmarks.md, issue 19). Anything else goes through ``decode``."""
    backend = _direct_backend(tokenizer)
    if backend is not None:
        return partial(backend.decode, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # looked up when used


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), *, native: bool = True):
        self._decode = decoder_of(tokenizer)
        backend = _direct_backend(tokenizer) if native and _DecodeStream is not None else None
        # one Rust call a token (the same method), until a step it cannot take (see above)
        self._step: Callable[[int], str | None] | None = None
        if backend is not None and isinstance(backend.decoder, decoders.ByteLevel):
            self._step = partial(_DecodeStream(skip_special_tokens=True).step, backend)
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # everything decoded so far
        self._emitted = 0  # characters of _text already handed out
        self.stopped = False
        self.tokens_used = 0  # tokens consumed, up to and including the one that hit a stop

    def push(self, token_ids: tuple[int, ...] | list[int]) -> str:
        """Add tokens; return the text that can be shown now. Stops consuming at a stop string."""
        out: list[str] = []
        for tid in token_ids:
            if self.stopped:
                break
            self._ids.append(tid)
            self.tokens_used += 1
            if self._step is not None:
                try:
                    piece = self._step(tid)
                except Exception:  # the corner the Rust step refuses: the Python method
                    self._to_python()
                    piece = self._decode_next()
                if piece:
                    self._text += piece
            else:
                self._text += self._decode_next()
            out.append(self._release())
        return "".join(out)

    def _to_python(self) -> None:
        """Leave the Rust step for good: the offsets the Python method would have reached on the
        tokens before the last (whose text is already in ``_text``), found by replaying them."""
        self._step = None
        ids, self._ids = self._ids, []
        self._prefix_offset = self._read_offset = 0
        for tid in ids[:-1]:
            self._ids.append(tid)
            self._decode_next()
        self._ids.append(ids[-1])

    def finish(self) -> str:
        """The held-back tail, once no more tokens will come."""
        if self.stopped:
            return ""
        tail = self._text[self._emitted :].rstrip(_INCOMPLETE)
        self._emitted = len(self._text)
        return tail

    @property
    def text(self) -> str:
        return self._text[: self._emitted]

    def _decode_next(self) -> str:
        ids = self._ids
        prefix = self._decode(ids[self._prefix_offset : self._read_offset])
        full = self._decode(ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            return full[len(prefix) :]
        return ""

    def _release(self) -> str:
        if self._stop:
            start = max(0, self._emitted - max(len(s) for s in self._stop))
            hits = [p for s in self._stop if (p := self._text.find(s, start)) >= 0]
            if hits:
                end = min(hits)
                out = self._text[self._emitted : end] if end > self._emitted else ""
                self._text = self._text[:end]
                self._emitted = len(self._text)
                self.stopped = True
                return out
        safe = len(self._text) - self._held_back()
        if safe <= self._emitted:
            return ""
        out = self._text[self._emitted : safe]
        self._emitted = safe
        return out

    def _held_back(self) -> int:
        """Characters at the end that might be the start of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

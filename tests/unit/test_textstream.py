"""Incremental detokenization with stop strings: the text equals a one-shot decode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparecycles.coordinator.textstream import TextStream, decoder_of

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Ünïcödé café naïve — 日本語 text!",
    "Stop here: END of the line, and then some more words after the end.",
] * 20


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|eos|>")


def _stream(tok, ids, stop=(), chunk=1):
    ts = TextStream(tok, stop)
    out = [ts.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    out.append(ts.finish())
    return "".join(out), ts


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_streamed_text_equals_full_decode(tok, chunk) -> None:
    ids = tok.encode(CORPUS[0] + " " + CORPUS[1])
    text, ts = _stream(tok, ids, chunk=chunk)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert ts.tokens_used == len(ids) and not ts.stopped


def test_stop_string_cuts_text_and_counts_tokens_to_it(tok) -> None:
    full = CORPUS[1]
    ids = tok.encode(full)
    text, ts = _stream(tok, ids, stop=("END",))
    assert text == full[: full.index("END")]
    assert ts.stopped
    assert ts.tokens_used < len(ids)
    assert "END" in tok.decode(ids[: ts.tokens_used])
    assert "END" not in tok.decode(ids[: ts.tokens_used - 1])


def test_text_that_might_start_a_stop_string_is_held_back(tok) -> None:
    ts = TextStream(tok, ("END",))
    shown = ts.push(tok.encode("Stop here: EN"))
    assert not shown.endswith("EN")
    assert ts.finish().endswith("EN")


@settings(deadline=None)
@given(st.text(min_size=1, max_size=60), st.integers(1, 5))
def test_any_text_round_trips(tok, text, chunk) -> None:
    ids = tok.encode(text)
    streamed, _ = _stream(tok, ids, chunk=chunk)
    assert streamed == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


@pytest.mark.parametrize("clean_up", [False, True])
def test_the_direct_decoder_gives_what_decode_gives(tok, clean_up) -> None:
    """A fast tokenizer without clean-up is decoded by its Rust backend directly; with clean-up
    (which transformers applies in Python) through ``decode``: the same text either way."""
    before = tok.clean_up_tokenization_spaces
    tok.clean_up_tokenization_spaces = clean_up
    try:
        decode = decoder_of(tok)
        assert (getattr(decode, "func", None) == tok.backend_tokenizer.decode) is not clean_up
        for text in [*CORPUS[:2], "a , b . c", "x<|eos|>y"]:
            ids = tok.encode(text)
            assert decode(ids) == tok.decode(ids, skip_special_tokens=True)
    finally:
        tok.clean_up_tokenization_spaces = before


def _chunks(tok, ids, stop=(), chunk=1, native=True):
    """Every push's text, the tail, and the tokens used: what a client is sent, chunk by chunk."""
    ts = TextStream(tok, stop, native=native)
    out = [ts.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return out, ts.finish(), ts.tokens_used, ts.stopped


def test_a_byte_level_tokenizer_is_stepped_in_rust(tok) -> None:
    assert TextStream(tok)._step is not None  # the path the comparisons below exercise
    assert TextStream(tok, native=False)._step is None


@settings(deadline=None, max_examples=300)
@given(st.one_of(st.text(min_size=1, max_size=60).map(lambda s: ("text", s)),
                 st.lists(st.integers(0, 399), min_size=1, max_size=40).map(lambda s: ("ids", s))),
       st.integers(1, 4), st.sampled_from([(), ("END",), ("é", "the"), ("\ufffd",)]))
def test_the_rust_step_gives_the_same_chunks_as_the_python_method(tok, what, chunk, stop) -> None:
    """Token by token, the same text in the same chunks, the same tokens used up to a stop: for
    any text, and for any ids at all (bytes that are not UTF-8, special tokens in between)."""
    kind, value = what
    ids = tok.encode(value) if kind == "text" else value
    assert _chunks(tok, ids, stop, chunk) == _chunks(tok, ids, stop, chunk, native=False)


def test_a_failed_rust_step_hands_over_to_the_python_method(tok) -> None:
    ids = tok.encode(CORPUS[0])
    want = _chunks(tok, ids, native=False)
    ts = TextStream(tok)
    real = ts._step
    calls = 0

    def failing(tid: int) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 7:
            raise Exception("InvalidPrefix")
        assert real is not None
        return real(tid)

    ts._step = failing
    out = [ts.push([i]) for i in ids]
    assert (out, ts.finish(), ts.tokens_used, ts.stopped) == want
    assert ts._step is None and calls == 7

"""Micro-costs of the coordinator's per-request and per-token-message steps, in one process.

CPU microseconds a call (best of several repeats, so a busy machine blurs them less than
end-to-end figures), for the steps of a streamed chat request that do not touch the database or
placement: parsing a node's ``tokens`` message, rendering and tokenizing a short chat prompt,
detokenizing 16 tokens one message each (the Rust step and the Python method side by side),
hashing token ids, checking a node's signed result. Run it with a tree's ``src`` first on
``PYTHONPATH`` to measure that tree:

    PYTHONPATH=src python bench/request_path_micro.py --model-dir /tmp/tiny2
"""

from __future__ import annotations

import argparse
import inspect
import timeit
from collections.abc import Callable
from typing import Any

from sparecycles import modelfiles, protocol
from sparecycles.coordinator.textstream import TextStream
from sparecycles.identity import NodeIdentity, verify


def best_us(fn: Callable[[], Any], number: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="/tmp/tiny2")
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    n = args.number
    tok = modelfiles.load_tokenizer(args.model_dir)
    rows: list[tuple[str, float]] = []
    frame = ('{"type":"tokens","v":1,"job_id":"job_0123456789abcdefghij","attempt":1,'
             '"index":5,"token_ids":[1234]}')
    rows.append(("parse a tokens message (orjson + pydantic)",
                 best_us(lambda: protocol.decode_node_message(frame), n * 10)))
    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
    rows.append(("render and tokenize a short chat prompt (render_chat)",
                 best_us(lambda: modelfiles.render_chat(tok, messages), n)))
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rows.append(("  of which the template alone",
                 best_us(lambda: tok.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=False), n)))
    rows.append(("  tokenize: transformers' encode",
                 best_us(lambda: tok.encode(text, add_special_tokens=False), n)))
    encode_text = getattr(modelfiles, "encode_text", None)  # absent from older trees
    if encode_text is not None:
        rows.append(("  tokenize: encode_text (the backend directly where equal)",
                     best_us(lambda: encode_text(tok, text, add_special_tokens=False), n)))
    ids = tok.encode("The quick brown fox jumps over the lazy dog and then some more words")[:16]
    # an older tree has one method, without the ``native`` switch
    has_native = "native" in inspect.signature(TextStream).parameters
    for native in (False, True) if has_native else (True,):
        def stream(native: bool = native) -> None:
            ts = TextStream(tok, native=False) if not native else TextStream(tok)
            for i in ids:
                ts.push((i,))
            ts.finish()
        label = "as the tree streams" if native else "the Python method"
        rows.append((f"detokenize 16 tokens one message each ({label})", best_us(stream, n)))
    prompt = list(range(1000, 1040))
    rows.append(("tokens_sha256 of 40 ids", best_us(lambda: protocol.tokens_sha256(prompt),
                                                    n * 5)))
    ident = NodeIdentity.generate()
    metering = protocol.Metering(prompt_tokens=40, completion_tokens=16,
                                 time_to_first_token_s=0.01, total_s=0.05, busy_s=0.04)
    payload = protocol.result_payload(job_id="job_1", attempt=1, weights_sha256="a" * 64,
                                      prompt_sha256="b" * 64, output_sha256="c" * 64,
                                      finish_reason="stop", metering=metering)
    signature = ident.sign(payload)
    rows.append(("check a node's signed result (Ed25519 verify)",
                 best_us(lambda: verify(ident.public_key_b64, payload, signature), n // 4)))
    for label, us in rows:
        print(f"{label:62s} {us:8.2f} us")


if __name__ == "__main__":
    main()

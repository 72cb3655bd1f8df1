"""The cost of constrained decoding: grammar compile time, and grammar step time / decode step.

On the real transformers engine (batch of one, CPU): decodes ``--jobs`` JSON-schema-constrained
jobs, and as many plain ones; then replays each constrained output through a fresh llguidance
matcher, timing the grammar's own work per token (mask + consume, the part constrained decoding
adds) against the engine's decode step (its busy time per decode step on the plain jobs). Also
times compiling a few schemas (the coordinator does this once per request, the node once per job).

    python bench/constrained.py --model /path/to/model --jobs 20

The vocabulary matters: llguidance's mask walks a token trie, so a 150k-token vocabulary costs
more per step than the tiny model's 2.8k. Report the vocabulary size with the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from sparecycles import grammar, modelfiles
from sparecycles.node.backends import sampling
from sparecycles.node.backends.base import GenerationRequest
from sparecycles.node.backends.transformers import TransformersEngine
from sparecycles.types import SamplingParams

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "email": {"type": "string", "format": "email"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
TOOLS_REQUIRED = {"type": "array", "minItems": 1, "items": {"anyOf": [
    {"type": "object", "properties": {"name": {"enum": [f"tool_{i}"]},
                                      "parameters": {"type": "object", "properties": {
                                          f"arg_{j}": {"type": "string"} for j in range(6)}}},
     "required": ["name", "parameters"]} for i in range(32)]}}


def _run(engine: TransformersEngine, prompt: tuple[int, ...], params: SamplingParams
         ) -> list[int]:
    done, ids = threading.Event(), []

    def on_update(u) -> None:
        ids.extend(u.token_ids)
        if u.finished:
            done.set()

    engine.submit(GenerationRequest(f"b{time.perf_counter_ns()}", prompt, params), on_update)
    assert done.wait(300)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a model directory (default: build the tiny model)")
    ap.add_argument("--jobs", type=int, default=20)
    args = ap.parse_args()
    path = args.model
    if path is None:
        from sparecycles.tools.tinymodel import build_tiny_model

        path = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    engine = TransformersEngine.load("m", path, device="cpu", batch_size_max=1)
    tok = engine.tokenizer
    prompt = tuple(modelfiles.render_chat(tok, [{"role": "user", "content": "A person?"}]))
    compiler = grammar.GrammarCompiler(grammar.from_hf_tokenizer(
        tok, engine.vocab_size, engine._eos_ids))
    print(f"vocabulary: {engine.vocab_size} tokens; model {path}")

    for label, schema in (("person", PERSON), ("32 tools, required", TOOLS_REQUIRED)):
        text = grammar.json_schema_grammar(schema)
        times = [compiler.matcher(text).compile_s for _ in range(10)]
        print(f"compile {label:20s} median {statistics.median(times) * 1e3:7.2f} ms  "
              f"max {max(times) * 1e3:7.2f} ms")

    text = grammar.json_schema_grammar(PERSON)
    outputs = []
    before = engine.stats()
    for seed in range(args.jobs):
        outputs.append(_run(engine, prompt, SamplingParams(max_tokens=96, temperature=1.0,
                                                           seed=seed, grammar=text)))
    mid = engine.stats()
    for seed in range(args.jobs):
        _run(engine, prompt, SamplingParams(max_tokens=96, temperature=1.0, seed=seed,
                                            ignore_eos=True))
    after = engine.stats()
    engine.close()
    step_constrained = (mid.busy_s - before.busy_s) / max(1, mid.decode_steps
                                                           - before.decode_steps)
    step_plain = (after.busy_s - mid.busy_s) / max(1, after.decode_steps - mid.decode_steps)

    # the grammar's own work per token, replayed over the constrained outputs
    grammar_s, tokens = 0.0, 0
    logits = np.zeros(engine.vocab_size, dtype=np.float32)
    for ids in outputs:
        row = sampling.start_row(SamplingParams(max_tokens=96, grammar=text), prompt,
                                 sorted(engine._eos_ids), matcher=compiler.matcher(text).matcher)
        for token in ids:
            t0 = time.perf_counter()
            sampling._apply_grammar(logits.copy(), row)
            row.matcher.consume_token(token)
            grammar_s += time.perf_counter() - t0
            tokens += 1
    per_token = grammar_s / max(1, tokens)
    print(f"decode step, plain jobs (batched path):      {step_plain * 1e3:8.3f} ms")
    print(f"decode step, constrained jobs (row step):    {step_constrained * 1e3:8.3f} ms")
    print(f"grammar work per token (mask + consume):     {per_token * 1e3:8.3f} ms over "
          f"{tokens} tokens")
    print(f"grammar step / plain decode step:            {per_token / step_plain:8.2e}")
    print(f"constrained step / plain decode step:        {step_constrained / step_plain:8.3f}")


if __name__ == "__main__":
    main()

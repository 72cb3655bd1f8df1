"""The tiny model's own greedy answers, computed without the network: what end-to-end tests of
split, handed-over or relayed generation must equal token for token.

Importable from any test module (``tests/`` is on ``sys.path``: see ``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM

from sparecycles import modelfiles
from sparecycles.coordinator.textstream import TextStream


class Greedy(NamedTuple):
    tokens: list[int]
    text: str
    prompt_tokens: int


def greedy_reference(path: Path | str, prompts: tuple[str, ...] | list[str],
                     tokens_max: int = 60) -> dict[str, Greedy]:
    """For each prompt (rendered as a completion), the unsplit model's greedy tokens up to
    ``tokens_max`` or its end of sequence, in fp32 with no cache, and their text as the
    coordinator's incremental detokenizer writes it."""
    tok = modelfiles.load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    out = {}
    for prompt in prompts:
        ids = modelfiles.render_completion(tok, prompt)
        gen: list[int] = []
        with torch.inference_mode():
            for _ in range(tokens_max):
                t = int(model(torch.tensor([ids + gen])).logits[0, -1].argmax())
                if t in eos_ids:
                    break
                gen.append(t)
        stream = TextStream(tok, ())
        text = "".join(stream.push((t,)) for t in gen) + stream.finish()
        out[prompt] = Greedy(gen, text, len(ids))
    return out

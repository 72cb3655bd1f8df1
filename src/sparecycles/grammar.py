"""Constrained decoding with llguidance: grammars from JSON schemas, compiled per tokenizer.

Shared by the coordinator (which checks a grammar compiles before admitting a job) and the node
(which decodes with it), as modelfiles is.

The coordinator turns a request's ``response_format`` or forced tool call into an llguidance
grammar (``json_schema_grammar``), checks it compiles within the limits (a 400 otherwise), and
sends the grammar's text in the job (``Sampling.grammar``). The node compiles it again against
its engine's vocabulary (``GrammarCompiler.matcher``); the sampling step (``sampling.py``) masks
every token the grammar forbids and advances the matcher with each token drawn.

llguidance builds its token trie from a Hugging Face tokenizer (``from_hf_tokenizer``) or from
llama.cpp's vocabulary (``llguidance.llamacpp.lltokenizer_from_vocab``); either gives the
``LLTokenizer`` this module takes, so every backend shares the same matcher.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sparecycles import limits
from sparecycles.errors import InvalidRequest

# llguidance's own bounds on one grammar's work: fuel is its unit of compile and mask work
# (initial: ~50k per ms, so ~20 ms to build the lexer; each token's step ~14k per ms, so ~14 ms
# at most), which bounds compile time and every token's mask whatever the schema. Its defaults,
# with the grammar's size and lexer states halved.
_parser_limits: dict[str, Any] = {
    "max_grammar_size": 250_000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "max_lexer_states": 125_000,
    "max_items_in_row": 2_000,
    "step_max_items": 50_000,
}
# Output JSON without optional whitespace: a model cannot pad forever between two tokens.
_json_options: Any = {"whitespace_flexible": False, "coerce_one_of": True}


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def parser_limits() -> Any:
    import llguidance

    return llguidance.LLParserLimits(**_parser_limits)


def json_schema_grammar(schema: dict[str, Any] | None, param: str = "response_format") -> str:
    """The llguidance grammar of JSON text matching ``schema`` (None: any JSON object)."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc}", param=param) from None


def schema_depth(value: Any, depth: int = 0) -> int:
    """Nesting of dicts and lists in a JSON value (a schema's depth)."""
    if isinstance(value, dict):
        return max((schema_depth(v, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((schema_depth(v, depth + 1) for v in value), default=depth + 1)
    return depth


def check_schema_size(schema: Any, param: str) -> None:
    """A 400 naming the limit for a schema too large or too deep to compile."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > limits.json_schema_bytes_max:
        raise InvalidRequest(f"the JSON schema has {size} bytes; the limit "
                             f"(json_schema_bytes_max) is {limits.json_schema_bytes_max}",
                             param=param, code="json_schema_too_large")
    depth = schema_depth(schema)
    if depth > limits.json_schema_depth_max:
        raise InvalidRequest(f"the JSON schema nests {depth} deep; the limit "
                             f"(json_schema_depth_max) is {limits.json_schema_depth_max}",
                             param=param, code="json_schema_too_deep")


def from_hf_tokenizer(tokenizer: Any, n_vocab: int, eos_ids: frozenset[int] | set[int]) -> Any:
    """An ``LLTokenizer`` over a Hugging Face (fast) tokenizer, with the engine's vocabulary
    size (embedding rows, often rounded up) and end-of-sequence tokens."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab,
                                        eos_token=sorted(eos_ids) or None)


@dataclass(slots=True)
class Compiled:
    matcher: Any  # llguidance.LLMatcher, at the start of the output
    compile_s: float


class GrammarCompiler:
    """Compiles grammars against one engine's vocabulary; thread-safe (llguidance is)."""

    def __init__(self, ll_tokenizer: Any) -> None:
        self.ll_tokenizer = ll_tokenizer

    def matcher(self, grammar: str, param: str = "response_format") -> Compiled:
        """A fresh matcher; ``InvalidRequest`` naming ``param`` where llguidance rejects the
        grammar or its limits (``_parser_limits``) are hit."""
        import llguidance

        started = time.perf_counter()
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=parser_limits())
        elapsed = time.perf_counter() - started
        if m.is_error():
            raise InvalidRequest(f"the grammar engine refused this schema: "
                                 f"{m.get_error()[:500]}", param=param, code="invalid_grammar")
        return Compiled(m, elapsed)

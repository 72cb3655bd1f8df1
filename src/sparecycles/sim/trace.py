"""Workload traces: when requests arrive and how many tokens they read and write.

The Azure LLM inference traces (Azure Public Dataset, released with Splitwise, Patel et al.,
ISCA 2024; CC-BY-4.0) are read from shared/data; see its README. A trace can be scaled to more
requests by superposing copies of itself, each shifted by a random offset (wrapping around its
duration): the arrival rate grows, the mix of request sizes stays.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sparecycles.errors import NotFound

TRACE_FILES = {"conv": "azure_llm_conv_2023.csv", "code": "azure_llm_code_2023.csv"}
# generated traces kept in the package (sparecycles/data/traces), with their generators
PACKAGED_TRACES = {"long": "synthetic_long_context.csv"}  # sim/synthetic.py
trace_requests_max = 50_000_000  # a sanity bound on one replay


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    epoch0_s: float  # UTC epoch second of arrival 0
    arrival_s: np.ndarray  # float64, sorted, from 0
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    # multi-turn traces only (sim/synthetic.py): the conversation of each request, and the
    # tokens its prompt shares with the conversation's previous turn (prompt and answer)
    conversation: np.ndarray | None = None  # int64
    prefix_tokens: np.ndarray | None = None  # int64

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0


def data_dir() -> Path:
    """$SPARECYCLES_DATA, else shared/data beside the project's checkout, else the copies of the
    traces shipped in the package (sparecycles/data/traces, with their attribution)."""
    env = os.environ.get("SPARECYCLES_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return here.parents[1] / "data" / "traces"


def _epoch(timestamp: str) -> float:
    # "2023-11-16 18:17:03.9799600": seven digits of fraction, strptime takes six
    head, _, frac = timestamp.strip().partition(".")
    dt = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


def load_trace(name_or_path: str) -> Trace:
    """``conv`` or ``code`` (the Azure traces in shared/data), or a CSV path with the same
    columns: TIMESTAMP, ContextTokens, GeneratedTokens."""
    path = Path(name_or_path)
    if name_or_path in TRACE_FILES:
        path = data_dir() / TRACE_FILES[name_or_path]
    elif name_or_path in PACKAGED_TRACES:
        path = Path(__file__).resolve().parents[1] / "data" / "traces"
        path = path / PACKAGED_TRACES[name_or_path]
    if not path.is_file():
        raise NotFound(f"no trace {name_or_path!r} (looked at {path})")
    times, prompts, outputs, convs, prefixes = [], [], [], [], []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            times.append(_epoch(row["TIMESTAMP"]))
            prompts.append(max(1, int(row["ContextTokens"])))
            outputs.append(max(1, int(row["GeneratedTokens"])))
            if "ConversationId" in row:
                convs.append(int(row["ConversationId"]))
                prefixes.append(int(row.get("PrefixTokens") or 0))
    order = np.argsort(np.asarray(times), kind="stable")
    t = np.asarray(times)[order]
    multi = len(convs) == len(times)
    return Trace(
        name=name_or_path if name_or_path in TRACE_FILES or name_or_path in PACKAGED_TRACES
        else path.stem,
        epoch0_s=float(t[0]),
        arrival_s=t - t[0],
        prompt_tokens=np.asarray(prompts, dtype=np.int64)[order],
        output_tokens=np.asarray(outputs, dtype=np.int64)[order],
        conversation=np.asarray(convs, dtype=np.int64)[order] if multi else None,
        prefix_tokens=np.asarray(prefixes, dtype=np.int64)[order] if multi else None,
    )


def head(trace: Trace, n_requests: int) -> Trace:
    """The first ``n_requests`` requests."""
    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[:n_requests]

    return Trace(
        trace.name, trace.epoch0_s, trace.arrival_s[:n_requests],
        trace.prompt_tokens[:n_requests], trace.output_tokens[:n_requests],
        cut(trace.conversation), cut(trace.prefix_tokens),
    )  # fmt: skip


def thinned(trace: Trace, fraction: float, seed: int) -> Trace:
    """About ``fraction`` of the requests, each kept independently (a Poisson thinning: the
    arrival process keeps its shape at a lower rate), at least one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must be in (0, 1]")
    keep = np.random.default_rng(seed).random(len(trace)) < fraction
    if not keep.any():
        keep[0] = True

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[keep]

    return Trace(
        f"{trace.name}/{1 / fraction:g}", trace.epoch0_s, trace.arrival_s[keep],
        trace.prompt_tokens[keep], trace.output_tokens[keep], cut(trace.conversation),
        cut(trace.prefix_tokens),
    )  # fmt: skip


def scaled(trace: Trace, n_requests: int, seed: int) -> Trace:
    """``n_requests`` requests over the trace's duration: superposed copies of the trace, each
    shifted by its own random offset (wrapping), the last copy cut short."""
    if not 0 < n_requests <= trace_requests_max:
        raise ValueError(f"n_requests must be in 1..{trace_requests_max}")
    if n_requests <= len(trace):
        return head(trace, n_requests)
    rng = np.random.default_rng(seed)
    copies = -(-n_requests // len(trace))
    duration = max(trace.duration_s, 1.0)
    shifts = rng.uniform(0.0, duration, size=copies)
    arrivals = np.concatenate([(trace.arrival_s + s) % duration for s in shifts])[:n_requests]
    prompts = np.tile(trace.prompt_tokens, copies)[:n_requests]
    outputs = np.tile(trace.output_tokens, copies)[:n_requests]
    order = np.argsort(arrivals, kind="stable")
    conv = prefix = None
    if trace.conversation is not None and trace.prefix_tokens is not None:
        # each copy's conversations are its own; a copy shifted past the trace's end wraps, and
        # a turn that lands before its predecessor finds no cache (a miss, as it should)
        span = int(trace.conversation.max()) + 1
        conv = np.concatenate([trace.conversation + k * span for k in range(copies)])
        conv = conv[:n_requests][order]
        prefix = np.tile(trace.prefix_tokens, copies)[:n_requests][order]
    return Trace(
        f"{trace.name}x{copies}", trace.epoch0_s, arrivals[order], prompts[order], outputs[order],
        conv, prefix,
    )  # fmt: skip

"""Many concurrent streaming clients against one or more coordinators. A test tool.

Closed loop: ``concurrency`` workers each send one streaming chat completion after another
(optionally paced to ``rate_per_s`` in total) until ``requests`` are sent or ``duration_s`` has
passed. Worker ``w`` uses URL ``w % len(urls)`` and key ``w % len(keys)``, so keys and replicas
share the load evenly (a key may have ``limits.streams_per_key_max`` streams in flight).

Request sizes come from a workload trace (the Azure LLM inference traces; see sim/trace.py),
capped so that the fake model's context holds them. Against fake nodes the schedule of every
token is known (``SpeedModel``), so each request yields the latency the coordinator adds:
``added_ttft_s`` = time to the first streamed event minus the fake node's scheduled time to first
token for the prompt length the coordinator reports in ``usage``, and ``added_total_s`` the same
for the whole stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from sparecycles.tools.loadtest.speed import SpeedModel

request_timeout_s = 120.0
errors_kept_max = 20  # distinct error messages kept in a report

_WORDS = ("the", "garden", "river", "light", "stone", "window", "morning", "house", "water",
          "field", "road", "tree", "small", "green", "quiet", "evening", "letter", "bread")


@dataclass(frozen=True, slots=True)
class Workload:
    """(prompt words, max_tokens) pairs to cycle through."""

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def fixed(cls, prompt_words: int, max_tokens: int) -> Workload:
        return cls(((prompt_words, max_tokens),))

    @classmethod
    def from_trace(cls, name: str, *, prompt_tokens_max: int, output_tokens_max: int,
                   count: int = 10_000, seed: int = 1) -> Workload:
        """Sizes of ``count`` requests drawn from a trace (``conv``, ``code`` or a CSV path),
        each capped; the chat template adds a few tokens to the prompt."""
        from sparecycles.sim.trace import load_trace

        trace = load_trace(name)
        rng = random.Random(seed)
        picks = [rng.randrange(len(trace)) for _ in range(min(count, len(trace)))]
        return cls(tuple(
            (max(1, min(prompt_tokens_max, int(trace.prompt_tokens[i]))),
             max(1, min(output_tokens_max, int(trace.output_tokens[i]))))
            for i in picks))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    urls: tuple[str, ...]
    keys: tuple[str, ...]
    model: str
    workload: Workload
    concurrency: int = 16
    requests: int = 0  # stop after this many (0: only the duration bounds the run)
    duration_s: float = 30.0
    rate_per_s: float = 0.0  # pace request starts to this total rate (0: as fast as answered)
    speed: SpeedModel = field(default_factory=SpeedModel)  # the fake nodes' timing, if any


@dataclass(slots=True)
class Sample:
    ok: bool
    status: int
    started_s: float  # from the run's start
    ttft_s: float  # to the first streamed event (the coordinator sends it with the first token)
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    content_chunks: int
    job_id: str
    text: str = ""
    error: str = ""


@dataclass
class RunResult:
    samples: list[Sample]
    wall_s: float
    config: dict[str, Any]

    def summary(self, speed: SpeedModel | None = None) -> dict[str, Any]:
        return summarize(self.samples, self.wall_s, speed)


def _prompt(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))


async def _one(client: httpx.AsyncClient, url: str, key: str, model: str, words: int,
               max_tokens: int, rng: random.Random, t0: float, keep_text: bool) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": _prompt(words, rng)}],
            "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, prompt_tokens, completion_tokens, chunks, job_id = 0.0, 0, 0, 0, ""
    parts: list[str] = []
    try:
        async with client.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
            job_id = resp.headers.get("x-sparecycles-job-id", "")
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                return Sample(False, resp.status_code, start - t0, 0.0,
                              time.perf_counter() - start, 0, 0, 0, job_id, error=text)
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if not ttft:
                    ttft = time.perf_counter() - start
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Sample(False, 200, start - t0, ttft, time.perf_counter() - start,
                                  0, 0, chunks, job_id, error=str(obj["error"])[:300])
                for choice in obj.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        chunks += 1
                        if keep_text:
                            parts.append(content)
                usage = obj.get("usage")
                if usage:
                    prompt_tokens = usage["prompt_tokens"]
                    completion_tokens = usage["completion_tokens"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Sample(False, 0, start - t0, ttft, time.perf_counter() - start, 0, 0, chunks,
                      job_id, error=f"{type(exc).__name__}: {exc}"[:300])
    return Sample(True, 200, start - t0, ttft, time.perf_counter() - start, prompt_tokens,
                  completion_tokens, chunks, job_id, text="".join(parts))


async def run_clients(config: ClientConfig, *, keep_text: bool = False, seed: int = 1,
                      on_progress: Callable[[list[Sample]], None] | None = None,
                      progress_interval_s: float = 1.0) -> RunResult:
    """Run the closed-loop load; returns every request's sample."""
    if not config.urls or not config.keys:
        raise ValueError("clients need at least one coordinator URL and one API key")
    samples: list[Sample] = []
    t0 = time.perf_counter()
    deadline = t0 + config.duration_s if config.duration_s > 0 else float("inf")
    issued = 0
    sizes = config.workload.sizes
    pool = httpx.Limits(max_connections=config.concurrency + 8,
                        max_keepalive_connections=config.concurrency + 8)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)

    def take() -> int | None:
        """The next request's number, or None when the run is over."""
        nonlocal issued
        if time.perf_counter() >= deadline or (config.requests and issued >= config.requests):
            return None
        issued += 1
        return issued - 1

    async with httpx.AsyncClient(limits=pool, timeout=timeout, trust_env=False) as client:

        async def worker(w: int) -> None:
            rng = random.Random(seed * 1_000_003 + w)
            url = config.urls[w % len(config.urls)]
            key = config.keys[w % len(config.keys)]
            while (n := take()) is not None:
                if config.rate_per_s > 0:
                    wait = t0 + n / config.rate_per_s - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                words, max_tokens = sizes[n % len(sizes)]
                samples.append(await _one(client, url, key, config.model, words, max_tokens,
                                          rng, t0, keep_text))

        async def report() -> None:
            while on_progress is not None:
                on_progress(samples)
                await asyncio.sleep(progress_interval_s)

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker(w) for w in range(config.concurrency)))
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    if on_progress is not None:
        on_progress(samples)
    cfg = asdict(config)
    cfg.pop("keys")
    cfg["workload"] = f"{len(sizes)} sizes"
    return RunResult(samples, time.perf_counter() - t0, cfg)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, int(q * 1000) - 1)]


def summarize(samples: list[Sample], wall_s: float,
              speed: SpeedModel | None = None) -> dict[str, Any]:
    """Requests/s, tokens/s, latency quantiles (ms) and, given the fake nodes' speed, the
    latency the coordinator added."""
    ok = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            k = f"{s.status}: {s.error[:120]}"
            if k in errors or len(errors) < errors_kept_max:
                errors[k] = errors.get(k, 0) + 1
    wall_s = max(wall_s, 1e-9)
    out: dict[str, Any] = {
        "requests": len(samples), "ok": len(ok), "failed": len(samples) - len(ok),
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(ok) / wall_s, 2),
        "tokens_per_s": round(sum(s.completion_tokens for s in ok) / wall_s, 1),
        "completion_tokens": sum(s.completion_tokens for s in ok),
        "ttft_p50_ms": _ms(_quantile([s.ttft_s for s in ok], 0.5)),
        "ttft_p99_ms": _ms(_quantile([s.ttft_s for s in ok], 0.99)),
        "errors": errors,
    }
    if speed is not None and ok:
        added_ttft = [s.ttft_s - speed.ttft_s(s.prompt_tokens) for s in ok]
        added_total = [s.total_s - speed.total_s(s.prompt_tokens, s.completion_tokens)
                       for s in ok]
        out.update(
            added_ttft_p50_ms=_ms(_quantile(added_ttft, 0.5)),
            added_ttft_p99_ms=_ms(_quantile(added_ttft, 0.99)),
            added_total_p50_ms=_ms(_quantile(added_total, 0.5)),
            added_total_p99_ms=_ms(_quantile(added_total, 0.99)),
        )
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def samples_to_json(samples: list[Sample]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(s).items() if k != "text"} for s in samples]


def samples_from_json(rows: list[dict[str, Any]]) -> list[Sample]:
    return [Sample(**row) for row in rows]

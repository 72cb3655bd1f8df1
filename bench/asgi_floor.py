"""The floor of the coordinator's design: the CPU per streamed request of a bare ASGI server that
does only the relaying, on the same server stack (uvicorn, uvloop, httptools, websockets).

Two servers, each a raw ASGI application with nothing else in it (no framework, no
authentication, no database, no placement, no tokenizer):

- ``sse``: ``POST /v1/chat/completions`` reads and parses the JSON body and streams the answer
  itself: a role chunk, 16 content chunks 5 ms apart, the finish and usage chunks and ``[DONE]``,
  one socket write per chunk as a relay makes when tokens arrive one by one;
- ``relay``: the same answer, but each token comes from a "node" over a WebSocket, as in the
  coordinator: the request picks a node (round robin), sends it a job message, and relays each
  of the node's token messages (JSON, parsed with orjson) to its stream through a queue; the
  nodes (another process, like the load test's fake nodes) send one message per token, 5 ms
  apart, then a done message.

The clients are the coordinator benchmark's (``tools/loadtest/clients.py``, the same requests), and
the server's CPU per request is read from ``/proc`` over a fixed number of requests after a
warm-up. Compare with ``bench/coordinator_cost.py``'s coordinator figure at the same
concurrency, measured in the same run of the machine:

    python bench/asgi_floor.py --concurrency 8,256 --requests 1200 --rounds 2

``--ws`` picks uvicorn's WebSocket implementation (``websockets-sansio``, the default's choice, or
``websockets``) and ``--server-python`` the server's interpreter (another Python version's venv
with ``uvicorn[standard]`` and ``orjson``): the floor under other parts of the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

tokens_per_answer = 16
token_gap_s = 0.005  # 200 tokens/s, as the load test's fake nodes
words = ("the", " cat", " sat", " on", " a", " mat", ",", " and", " then", " it", " left", ".")


# ---- the servers ---------------------------------------------------------------------------


def _chunk(id_: str, delta: dict[str, Any], finish: str | None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": id_, "object": "chat.completion.chunk", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }) + b"\n\n"


def _usage(id_: str) -> bytes:
    return b"data: " + orjson.dumps({
        "id": id_, "object": "chat.completion.chunk", "created": 0, "model": "tiny",
        "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens_per_answer,
                                 "total_tokens": 8 + tokens_per_answer}}) + b"\n\n"


class Floor:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.nodes: list[Any] = []  # each node's ASGI send
        self.pick = itertools.count()
        self.jobs: dict[str, asyncio.Queue[int | None]] = {}
        self.ids = itertools.count()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "websocket":
            await self.node(receive, send)
        elif scope["path"] == "/readyz":
            body = orjson.dumps({"status": "ready", "nodes_online": len(self.nodes)})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
        else:
            await self.chat(receive, send)

    async def node(self, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        self.nodes.append(send)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                msg = orjson.loads(message.get("text") or message.get("bytes") or b"{}")
                queue = self.jobs.get(msg["job_id"])
                if queue is not None:
                    queue.put_nowait(msg["token_ids"][0] if msg["type"] == "tokens" else None)
        finally:
            self.nodes.remove(send)

    async def chat(self, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = orjson.loads(body)
        job_id = f"job_{next(self.ids)}"
        id_ = "chatcmpl-" + job_id
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        if self.mode == "relay":
            self.jobs[job_id] = queue
            node = self.nodes[next(self.pick) % len(self.nodes)]
            await node({"type": "websocket.send", "text": orjson.dumps(
                {"type": "job", "job_id": job_id, "max_tokens": request["max_tokens"]}).decode()})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "more_body": True,
                    "body": _chunk(id_, {"role": "assistant", "content": ""}, None)})
        try:
            for i in range(tokens_per_answer):
                if self.mode == "relay":
                    token = await queue.get()
                    if token is None:
                        break
                else:
                    await asyncio.sleep(token_gap_s)
                    token = i
                await send({"type": "http.response.body", "more_body": True,
                            "body": _chunk(id_, {"content": words[token % len(words)]}, None)})
            if self.mode == "relay":
                await queue.get()  # the done message
        finally:
            self.jobs.pop(job_id, None)
        await send({"type": "http.response.body", "more_body": False,
                    "body": _chunk(id_, {}, "length") + _usage(id_) + b"data: [DONE]\n\n"})


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(Floor(args.mode), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, ws_per_message_deflate=False, ws=args.ws)


async def _nodes(url: str, count: int) -> None:
    import websockets

    async def one() -> None:
        async with websockets.connect(url, compression=None, max_size=None) as ws:
            tasks = set()

            async def answer(job_id: str, n: int) -> None:
                await asyncio.sleep(0.002)  # prefill
                for i in range(n):
                    await ws.send(orjson.dumps({"type": "tokens", "job_id": job_id, "attempt": 1,
                                                "index": i, "token_ids": [i]}).decode())
                    await asyncio.sleep(token_gap_s)
                await ws.send(orjson.dumps({"type": "done", "job_id": job_id}).decode())

            async for frame in ws:
                job = orjson.loads(frame)
                task = asyncio.create_task(answer(job["job_id"], job["max_tokens"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    await asyncio.gather(*(one() for _ in range(count)))


# ---- the measurement -----------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(url: str, nodes: int) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2, trust_env=False).json()[
                    "nodes_online"] >= nodes:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError("the floor server did not come up")


def _load(url: str, concurrency: int, requests: int) -> float:
    from sparecycles.tools.loadtest.clients import ClientConfig, Workload, run_clients

    config = ClientConfig(urls=(url,), keys=("sk-floor",), model="tiny",
                          workload=Workload.fixed(8, tokens_per_answer), concurrency=concurrency,
                          requests=requests, duration_s=0)
    result = asyncio.run(run_clients(config))
    bad = [s for s in result.samples if not s.ok or s.completion_tokens != tokens_per_answer]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    return result.wall_s


def measure(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from sparecycles.tools.localnet import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    here = str(Path(__file__).resolve())
    server = subprocess.Popen([args.server_python or sys.executable, here, "serve", "--mode",
                               mode, "--port", str(port), "--ws", args.ws])
    nodes = None
    rows = []
    try:
        _wait_ready(url, 0)
        if mode == "relay":
            nodes = subprocess.Popen([sys.executable, here, "nodes", "--url",
                                      f"ws://127.0.0.1:{port}/ws", "--count", str(args.fleet)])
            _wait_ready(url, args.fleet)
        for c in args.concurrency:
            _load(url, c, max(c, args.warmup))
            load0, cpu0 = os.getloadavg()[0], _cpu_s(server.pid)
            wall = _load(url, c, args.requests)
            cpu1 = _cpu_s(server.pid)
            rows.append({"mode": mode, "concurrency": c, "req_per_s": args.requests / wall,
                         "server_cpu_ms": (cpu1 - cpu0) * 1000 / args.requests,
                         "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"})
            r = rows[-1]
            print(f"{mode:>6} {c:>4} {r['req_per_s']:>7.1f} {r['server_cpu_ms']:>8.3f} "
                  f"{r['load']:>10}", flush=True)
    finally:
        for p in (nodes, server):
            if p is not None:
                p.terminate()
                p.wait(15)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command")
    s = sub.add_parser("serve")
    s.add_argument("--mode", choices=("sse", "relay"), default="relay")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--ws", default=argparse.SUPPRESS)  # the top level's default stands
    n = sub.add_parser("nodes")
    n.add_argument("--url", required=True)
    n.add_argument("--count", type=int, default=50)
    ap.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")],
                    default=[8, 256])
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--warmup", type=int, default=256)
    ap.add_argument("--fleet", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ws", default="auto",
                    help="uvicorn's WebSocket implementation: auto, websockets, "
                         "websockets-sansio or wsproto")
    ap.add_argument("--server-python", default="",
                    help="the server's interpreter (another Python version; needs uvicorn[standard]"
                         " and orjson), this one by default")
    args = ap.parse_args()
    if args.command == "serve":
        serve(args)
        return
    if args.command == "nodes":
        asyncio.run(_nodes(args.url, args.count))
        return
    print(f"{'mode':>6} {'conc':>4} {'req/s':>7} {'cpu ms':>8} {'load':>10}")
    rows = []
    for _ in range(args.rounds):
        for mode in ("sse", "relay"):
            rows += measure(mode, args)
    print("\nmedians (server CPU ms per request):")
    for mode in ("sse", "relay"):
        for c in args.concurrency:
            one = [r["server_cpu_ms"] for r in rows if r["mode"] == mode
                   and r["concurrency"] == c]
            print(f"  {mode:>6} c={c:<4} {statistics.median(one):.3f} ms")


if __name__ == "__main__":
    main()

"""What a stage on another replica costs a chain: the tiny model split over two stage processes,
the second stage connected to the same replica as the client (``local``) or to another one
(``relayed``: its frames cross NATS both ways), side by side in one run on loopback, two
replicas on PostgreSQL (127.0.0.1:5432) and NATS (127.0.0.1:4222).

Both chains share the first stage (one node holding layers 0:2 of two model names, ``local`` and
``relayed``, the same files); the second stage (2:4) of ``local`` is a node of replica ``a``, of
``relayed`` a node of replica ``b``. Every request goes to ``a``. The tiny model's steps take a
millisecond or two, so the difference per token is mostly the relay: per decoded token the
second stage gets one ``stage_forward`` (an activation) and answers one ``stage_output`` (a
token), so ``relayed`` adds two bus messages and two more socket hops per token. Rounds
alternate the two, back to back; the medians are the result. Also printed: the relay envelope's
cost for the largest activation frame, against the JSON-in-JSON envelope it replaced. Run:

    PYTHONPATH=src nice -n 5 python bench/chain_replicas.py [--rounds 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain_speed import PROMPTS, one

from fixtures_models import cached_model
from sparecycles import limits, protocol
from sparecycles.coordinator.replication.fleet import pack_frame, unpack_frame
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import Cluster, postgres_database


def envelopes() -> None:
    cols = 1024  # the ~290M model's width: a prefill chunk of the most bytes a message holds
    rows = limits.activation_bytes_max // (cols * 4)
    act = protocol.Activation(dtype="float32", shape=(rows, cols),
                              data=protocol.b64(os.urandom(rows * cols * 4)))
    frames = {
        "tokens (1 token)": protocol.encode(protocol.Tokens(
            job_id="job_0123456789abcdef", attempt=1, index=10, token_ids=[1234])),
        f"stage_output ({rows} x {cols} float32)": protocol.encode(protocol.StageOutput(
            sequence_id="job_0123456789abcdef.2", step=123456, hidden=act, busy_s=0.01)),
    }
    head = {"r": "c1", "node": "node_0123456789abcdef"}
    print("\nrelay envelope, pack + unpack (us) and bytes on the bus:")
    for name, frame in frames.items():
        n = 20_000 if len(frame) < 1000 else 50
        t = time.perf_counter()
        for _ in range(n):
            unpack_frame(pack_frame(head, frame))
        new = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            json.loads(json.dumps({**head, "frame": frame}, separators=(",", ":")))["frame"]
        old = (time.perf_counter() - t) / n
        print(f"  {name}: frame {len(frame):,} B; header + frame {len(pack_frame(head, frame)):,}"
              f" B: {new * 1e6:.1f} us; frame inside JSON "
              f"{len(json.dumps({**head, 'frame': frame})):,} B: {old * 1e6:.1f} us "
              f"(bus max {limits.bus_message_bytes_max:,} B)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    path = cached_model("tiny", 0)
    print(f"load: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) on "
          f"{os.cpu_count()} cores; model {path.name}")
    with tempfile.TemporaryDirectory() as root, postgres_database(prefix="sc_bench") as pg, \
            Cluster(root=Path(root), models={"local": path, "relayed": path},
                    env={"SPARECYCLES_VERIFICATION": "false", "OMP_NUM_THREADS": "1"},
                    postgres_url=pg, bus=Cluster.namespace_bus()) as net:
        store = net.store()
        for name in ("a", "b"):
            net.start_replica(name)
        net.start_node("head", "o1", extra_args=["--layers", "0:2"],
                       coordinator_url=net.urls("a"))
        net.start_node("tail-a", "o2", extra_args=["--layers", "2:4"],
                       coordinator_url=net.urls("a"), models={"local": path})
        net.start_node("tail-b", "o3", extra_args=["--layers", "2:4"],
                       coordinator_url=net.urls("b"), models={"relayed": path})
        net.wait_replica("a", 2)
        net.wait_replica("b", 1)
        net.wait_replica("a", 3, key="fleet_nodes_available", timeout_s=60)
        _, key = store.create_api_key("bench", "relay")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("bench"), 10_000_000_000, reference="bench")
        client = OpenAI(base_url=net.replicas["a"].url + "/v1", api_key=key, max_retries=0,
                        timeout=600)
        for model in ("local", "relayed"):  # warm up
            one(client, store, model, PROMPTS[0], 4)
        # prompts the tiny model continues for a while (it stops early after some)
        prompts = [p for p in (*PROMPTS, "Once upon a time there was", "The old man said that",
                               "Where does the river go? It", "The garden")
                   if one(client, store, "local", p, args.tokens).tokens >= args.tokens // 2]
        assert prompts, "the tiny model ends every candidate prompt early"
        rounds = []
        for k in range(args.rounds):
            prompt = prompts[k % len(prompts)]
            rounds.append({m: one(client, store, m, prompt, args.tokens)
                           for m in ("local", "relayed")})
    print(f"\n{'round':>5} | {'local ms/tok':>12} | {'relayed ms/tok':>14} | "
          f"{'relayed/local tok/s':>19} | same text")
    per_tok: dict[str, list[float]] = {"local": [], "relayed": []}
    ratios = []
    for k, r in enumerate(rounds):
        ms = {m: (x.last_s - x.first_s) / max(1, x.tokens - 1) * 1e3 for m, x in r.items()}
        for m in ms:
            per_tok[m].append(ms[m])
        ratio = r["relayed"].decode_tokens_per_s / r["local"].decode_tokens_per_s
        ratios.append(ratio)
        print(f"{k + 1:>5} | {ms['local']:12.2f} | {ms['relayed']:14.2f} | {ratio:19.2f} | "
              f"{r['local'].text == r['relayed'].text}")
    local, relayed = (statistics.median(per_tok[m]) for m in ("local", "relayed"))
    pairs = statistics.median(b - a for a, b in zip(per_tok["local"], per_tok["relayed"],
                                                    strict=True))
    print(f"\nmedian per token: local {local:.2f} ms, relayed {relayed:.2f} ms; the relay costs "
          f"{relayed - local:.2f} ms per token per relayed stage (median of the pairs: "
          f"{pairs:.2f} ms); relayed/local tok/s median {statistics.median(ratios):.2f}")
    envelopes()
    print(f"load after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Repair time of a chain: from the loss of its middle stage to the client's next token, with a
context of about 1,000 tokens. Real processes on loopback (tools/localnet): a coordinator and
four nodes holding layers 0:1, 1:3 (twice: the middle and its spare) and 3:4 of the tiny model.

A streamed greedy completion of a ~1,000-token prompt starts; after a few tokens the middle
stage's process is SIGKILLed; the time from the kill to the next token the client receives is
the repair (socket close noticed, replacement planned, its cache rebuilt from the ~1,000 inputs
the lost stage had received, the failed step retried). Run:

    PYTHONPATH=src python bench/chain_repair.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures_models import cached_model
from sparecycles import modelfiles
from sparecycles.identity import NodeIdentity
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork

CONTEXT_TOKENS = 1000


def prompt_of(path: Path, n: int) -> str:
    tok = modelfiles.load_tokenizer(str(path))
    corpus = (Path(modelfiles.__file__).parent / "data" / "corpus.txt").read_text()
    ids = tok.encode(corpus)[:n]
    return tok.decode(ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = cached_model("tiny", 0)
    prompt = prompt_of(model, CONTEXT_TOKENS)
    print(f"load: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as root, LocalNetwork(
            root=Path(root), models={"tiny": model},
            env={"SPARECYCLES_VERIFICATION": "false"}) as net:
        store = net.store()
        net.start_coordinator()
        slow = ["--duty-cycle", "0.2"]  # a decode slow enough to kill the stage mid-answer
        net.start_node("s0", "a", extra_args=["--layers", "0:1"])
        net.start_node("m1", "b", extra_args=["--layers", "1:3", *slow])
        net.start_node("m2", "c", extra_args=["--layers", "1:3", *slow])
        net.start_node("s2", "d", extra_args=["--layers", "3:4"])
        net.wait_ready(4)
        _, key = store.create_api_key("bench", "repair")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("bench"), 100_000_000, reference="bench")
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=120)
        ids = {NodeIdentity.load_or_create(Path(root) / "nodes" / n / "node_key.pem").node_id: n
               for n in ("m1", "m2")}
        times = []
        for run in range(args.runs):
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                               temperature=0, stream=True)
            seen, killed_at, gap = 0, None, None
            for chunk in stream:
                if not (chunk.choices and chunk.choices[0].text):
                    continue
                seen += 1
                if killed_at is not None and gap is None:
                    gap = time.perf_counter() - killed_at
                if killed_at is None and seen == 3:
                    job_id = chunk.id.split("-", 1)[1]
                    middle = next(ids[a.node_id] for a in store.attempts(job_id)
                                  if a.node_id in ids)
                    killed_at = time.perf_counter()
                    net.kill_node(middle)
            if gap is None:
                print(f"run {run}: the answer ended before a token followed the kill")
            else:
                times.append(gap)
                print(f"run {run}: killed {middle} after 3 tokens; next token {gap:.3f} s later")
            net.restart_node(middle)
            net.wait_ready(4)
        if times:
            print(f"repair, loss to next token, {CONTEXT_TOKENS}-token context: median "
                  f"{statistics.median(times):.3f} s over {len(times)} runs")


if __name__ == "__main__":
    main()

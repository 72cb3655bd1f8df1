"""Multi-turn conversations on two llama.cpp nodes: what the prefix cache and prefix-aware
placement save on the next turns' time to first token.

Each conversation opens with a document (a few hundred tokens) and a question, then asks
follow-ups; every turn resends the whole history, as chat clients do. Conversations run side
by side (one thread each, turns in order), through the ``openai`` client, against a
coordinator with two SmolLM2 (Q4_1) nodes on llama.cpp, one thread each. Three set-ups, each
on a fresh network, same conversations and greedy answers:

- ``no cache``: nodes started with ``--no-prefix-cache`` (every turn prefills its whole history);
- ``cache``: the nodes' prefix cache on, placement unaware of it (``SPARECYCLES_PREFIX_AWARE=0``):
  a turn gains only when it happens to land on the node of its previous turn;
- ``cache + aware``: placement offers each turn to the node holding its history
  (coordinator/prefixes.py), weighed against load by the scheduler.

    python bench/prefix_cache.py [--conversations 4] [--turns 4]

Prints, per set-up, time to first token (median and p90) of the first turns and of the later
ones, and how many later turns went to the node of their previous turn (from the attempts table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.tools.localnet import LocalNetwork
from sparecycles.tools.smollm2 import smollm2_path

DOCUMENT = (
    "The old lighthouse on the northern cape was built in 1871 from granite blocks cut in the "
    "quarry two miles inland. Its keeper, a widower named Tomas Reyes, lived there with his "
    "daughter Ana and a grey cat called Pepper. Every evening Tomas climbed the one hundred and "
    "twelve steps to light the lamp, and every morning Ana walked to the village school along "
    "the cliff path, past the fields of barley and the small chapel with a blue door. In the "
    "winter of 1893 a storm drove a fishing boat, the Santa Clara, onto the rocks below the "
    "lighthouse. Tomas and Ana rowed out in the dark and brought back all six fishermen. The "
    "village gave them a silver medal, which Ana kept in a wooden box for the rest of her "
    "life. Years later, when the lamp was replaced by an electric light and the keeper's post "
    "was closed, Ana became the village's first woman mayor. She planted an orchard of apple "
    "and pear trees beside the chapel, and she wrote a short book about the storm, the rescue "
    "and the life of a lighthouse family. The lighthouse still stands; its lamp is automatic "
    "now, and the keeper's cottage is a small museum where visitors can see the silver medal, "
    "the wooden box and a photograph of Pepper asleep on the windowsill. "
)
QUESTIONS = [
    "Read the text below and answer my questions briefly.\n\n{doc}\nWho was the keeper?",
    "What was the name of the cat?",
    "What happened in the winter of 1893?",
    "What did Ana become later?",
    "What can visitors see in the museum?",
    "How many steps did Tomas climb?",
]


def converse(client, model: str, turns: int, max_tokens: int, salt: int,
             out: list[tuple[int, float, str]]) -> None:
    messages: list[dict[str, str]] = []
    for turn in range(turns):
        text = QUESTIONS[turn % len(QUESTIONS)].format(doc=f"(copy {salt}) " + DOCUMENT)
        messages.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        first = None
        parts: list[str] = []
        job_id = ""
        stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                max_tokens=max_tokens, temperature=0)
        for chunk in stream:
            job_id = job_id or chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
        out.append((turn, first if first is not None else time.perf_counter() - t0, job_id))
        messages.append({"role": "assistant", "content": "".join(parts)})


def run(mode: str, args: argparse.Namespace) -> dict:
    env = {"SPARECYCLES_PREFIX_AWARE": "0" if mode == "cache" else "1"}
    node_args = ["--threads", "1"] + (["--no-prefix-cache"] if mode == "no cache" else [])
    with tempfile.TemporaryDirectory() as tmp, LocalNetwork(
            root=Path(tmp), models={"smol": smollm2_path()}, env=env) as net:
        from openai import OpenAI

        store = net.store()
        _kid, key = store.create_api_key("bench", "bench")
        Ledger(store.sessions, prices=PriceBook.default()).deposit(
            store.ensure_client("bench"), 100_000_000, reference="bench")
        net.start_coordinator()
        net.start_node("a", "owner-a", extra_args=node_args)
        net.start_node("b", "owner-b", extra_args=node_args)
        net.wait_ready(2)
        client = OpenAI(base_url=net.url + "/v1", api_key=key, max_retries=0, timeout=600)
        client.chat.completions.create(model="smol", max_tokens=2,  # warm both paths up
                                       messages=[{"role": "user", "content": "Hi"}])
        results: list[list[tuple[int, float, str]]] = [[] for _ in range(args.conversations)]
        threads = [threading.Thread(target=converse, args=(client, "smol", args.turns,
                                                           args.max_tokens, i, results[i]))
                   for i in range(args.conversations)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        same = later = 0
        for conv in results:
            nodes = [store.attempts(job_id.removeprefix("chatcmpl-"))[-1].node_id
                     for _turn, _ttft, job_id in conv]
            for prev, cur in itertools.pairwise(nodes):
                later += 1
                same += prev == cur
        first_turns = [ttft for conv in results for turn, ttft, _ in conv if turn == 0]
        later_turns = [ttft for conv in results for turn, ttft, _ in conv if turn > 0]
        return {"mode": mode, "wall_s": wall,
                "ttft_first_p50_ms": 1000 * statistics.median(first_turns),
                "ttft_later_p50_ms": 1000 * statistics.median(later_turns),
                "ttft_later_p90_ms": 1000 * statistics.quantiles(later_turns, n=10)[-1],
                "later_turns_on_previous_node": f"{same}/{later}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--modes", nargs="+", default=["no cache", "cache", "cache + aware"])
    args = ap.parse_args()
    rows = [run(mode, args) for mode in args.modes]
    print(f"{'set-up':>14} {'TTFT turn 1 p50':>16} {'later p50':>10} {'later p90':>10} "
          f"{'same node':>10} {'wall':>7}")
    for r in rows:
        print(f"{r['mode']:>14} {r['ttft_first_p50_ms']:>14.0f}ms "
              f"{r['ttft_later_p50_ms']:>8.0f}ms {r['ttft_later_p90_ms']:>8.0f}ms "
              f"{r['later_turns_on_previous_node']:>10} {r['wall_s']:>6.1f}s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Share of py-spy samples in named parts of the code, from ``--format raw`` recordings.

``bench/coordinator_cost.py --py-spy DIR`` writes one recording per tree and level (folded
stacks: ``frame;frame;... count``). This counts, for each file given, the samples whose stack
passes through any of the parts named: a part is the end of a file's path
(``scheduling/scheduler.py``) or a function in one (``snapshot@coordinator/node_conn.py``);
the default parts are placement's (the scheduler, the index, the snapshots, dispatch's
placement functions, the node watch). A sample is counted once however many parts it passes
through.

    python bench/spy_share.py artifacts/spy/*.txt
    python bench/spy_share.py --part scheduling/scheduler.py --part _reserve@dispatch.py FILE...
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

PLACEMENT = (
    "scheduling/scheduler.py",
    "scheduling/placement_index.py",
    "coordinator/placement.py",
    "coordinator/watch.py",  # the node watch (new tree)
    "snapshot@coordinator/node_conn.py",
    "_build_snapshot@coordinator/node_conn.py",
    "totals@coordinator/node_conn.py",
    "all_nodes@coordinator/dispatch.py",
    "_snapshots@coordinator/dispatch.py",
    "_schedule@coordinator/dispatch.py",
    "_scheduler_view@coordinator/dispatch.py",
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _matches(frame: str, parts: tuple[str, ...]) -> bool:
    m = _FRAME.match(frame.strip())
    if m is None:
        return False
    func, file = m.group("func"), m.group("file")
    for part in parts:
        name, _, suffix = part.rpartition("@")
        # py-spy names methods by class: "NodeConn.snapshot" matches "snapshot"
        if file.endswith(suffix) and (not name or func == name or func.endswith("." + name)):
            return True
    return False


def share(path: Path, parts: tuple[str, ...]) -> tuple[int, int]:
    total = hit = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        if any(_matches(frame, parts) for frame in stack.split(";")):
            hit += n
    return hit, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--part", action="append", default=[],
                    help="FILE_SUFFIX or FUNCTION@FILE_SUFFIX (repeat); default: placement's")
    args = ap.parse_args()
    parts = tuple(args.part) or PLACEMENT
    for path in args.files:
        hit, total = share(path, parts)
        print(f"{path.name}: {hit} of {total} samples ({100.0 * hit / max(1, total):.1f} %)")


if __name__ == "__main__":
    main()

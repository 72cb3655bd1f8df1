"""Activations on the wire: base64 in a JSON text frame (what the protocol does) against a binary
WebSocket frame (a JSON header, then the raw bytes), for one decode step and one prefill chunk of
the ~290M model (hidden size 1024, float32).

Measures what each costs the sender and the receiver per message (encode + decode, including the
pydantic validation the protocol does) and the bytes on the wire. Run:

    PYTHONPATH=src python bench/chain_wire.py
"""

from __future__ import annotations

import json
import os
import struct
import timeit

from sparecycles import protocol

HIDDEN = 1024


def json_b64(raw: bytes, rows: int) -> float:
    def once() -> None:
        act = protocol.Activation(dtype="float32", shape=(rows, HIDDEN), data=protocol.b64(raw))
        frame = protocol.encode(protocol.StageOutput(sequence_id="job.1", step=7, hidden=act))
        msg = protocol.decode_node_message(frame)
        assert isinstance(msg, protocol.StageOutput) and msg.hidden is not None
        msg.hidden.raw()
    n = 200 if rows == 1 else 20
    return min(timeit.repeat(once, number=n, repeat=3)) / n


def binary(raw: bytes, rows: int) -> float:
    def once() -> None:
        head = json.dumps({"type": "stage_output", "sequence_id": "job.1", "step": 7,
                           "dtype": "float32", "shape": [rows, HIDDEN]}).encode()
        frame = struct.pack("<I", len(head)) + head + raw
        (n,) = struct.unpack_from("<I", frame)
        json.loads(frame[4 : 4 + n])
        memoryview(frame)[4 + n :].tobytes()
    n = 200 if rows == 1 else 20
    return min(timeit.repeat(once, number=n, repeat=3)) / n


def main() -> None:
    print(f"load: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    for rows, what in ((1, "decode step"), (128, "prefill chunk")):
        raw = os.urandom(rows * HIDDEN * 4)
        b64_len = len(protocol.encode(protocol.StageOutput(
            sequence_id="job.1", step=7, hidden=protocol.Activation(
                dtype="float32", shape=(rows, HIDDEN), data=protocol.b64(raw)))))
        a, b = json_b64(raw, rows), binary(raw, rows)
        print(f"{what:14s} {rows * HIDDEN * 4:>8d} B raw | base64 JSON {b64_len:>8d} B "
              f"{a * 1e6:8.1f} us | binary {len(raw) + 100:>8d} B {b * 1e6:8.1f} us | "
              f"ratio {a / b:5.1f}")


if __name__ == "__main__":
    main()

"""The coordinator's reading of a node's socket frames (``api/node_ws._receive``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sparecycles import limits, protocol
from sparecycles.api.node_ws import _receive
from sparecycles.errors import ProtocolError


class _Frames:
    """A socket that has received one ASGI message."""

    def __init__(self, message: dict[str, Any]):
        self.message = message

    async def receive(self) -> dict[str, Any]:
        return self.message


async def test_a_binary_frame_is_read_as_text():
    # A frame a node sends for a job another replica owns is relayed inside a JSON message
    # (fleet.relay_from_node): as bytes it made json.dumps raise and ended the node's socket.
    text = protocol.encode(protocol.JobError(job_id="job-1", attempt=1, message="oom"))
    raw = await _receive(_Frames({"type": "websocket.receive", "bytes": text.encode()}), 1.0)
    assert raw == text
    json.dumps({"frame": raw})
    assert protocol.decode_node_message(raw) == protocol.JobError(job_id="job-1", attempt=1,
                                                                  message="oom")


async def test_a_text_frame_is_read_as_it_came():
    raw = await _receive(_Frames({"type": "websocket.receive", "text": '{"type":"x"}'}), 1.0)
    assert raw == '{"type":"x"}'


@pytest.mark.parametrize("frame", [b"\xff\xfe{}", b" " * (limits.ws_message_bytes_max + 1)])
async def test_a_bad_binary_frame_is_a_protocol_error(frame: bytes):
    with pytest.raises(ProtocolError):
        await _receive(_Frames({"type": "websocket.receive", "bytes": frame}), 1.0)

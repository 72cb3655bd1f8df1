"""A load harness for the coordinator's control plane. A test tool, not a backend.

Nothing here runs a model or ever serves a real client. ``fakenodes`` hosts many lightweight
fake nodes in one process: each is a real protocol client (its own Ed25519 key, challenge and
hello, heartbeats, signed ``done`` reports) that answers every job with random token ids on a
schedule computed from a ``SpeedModel`` (time to first token from the prompt length, then one
token every inter-token interval). ``clients`` drives many concurrent streaming chat
completions against one or more coordinator URLs and measures requests/s, tokens/s, and the
latency the coordinator adds on top of the fake node's known schedule.

Because the fake nodes' timing is exact, what a client sees beyond it is the control plane's
cost: admission, placement, relaying tokens, settlement, and the harness's own event loops
(reported separately by the fake nodes as their lag behind schedule).

The fake nodes' tokens are random and meaningless; a coordinator under load test must run with
verification off (``SPARECYCLES_VERIFICATION=false``), or its spot checks would quarantine them.
``docs/benchmarks.md`` has the commands and results.
"""

from sparecycles.tools.loadtest.speed import SpeedModel

__all__ = ["SpeedModel"]

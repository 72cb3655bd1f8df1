"""Which node holds which prompt prefix in its KV cache: the coordinator's side of prefix-aware
placement (as cache-aware routers such as SGLang's do it, by blocks of tokens).

A node whose engine keeps a prefix cache (``protocol.FEATURE_PREFIX_CACHE``: the llama.cpp
backend keeps, in each idle slot, the cells of the last request that slot served) holds, after
a job, the job's prompt and answer. The next turn of that conversation resends the whole history
and so starts with those tokens: placed on that node, it prefills only the new message.

Tokens are cut into blocks of ``block_tokens``; a block's key chains the key of the block before
it, so one key names a whole prefix. For each node the index keeps the token sequences of its
last ``slots`` jobs (the node's slots: an older one has been overwritten there), and for each
key the nodes holding it. A prompt's longest held prefix on each node is then a walk down its
block keys. The index is a model of the nodes' caches, not a copy: a node may have evicted a
prefix to make room, and then the job prefills a little more than predicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

block_tokens = 16  # the index's granularity: a held prefix counts in whole blocks


def block_keys(tokens: Sequence[int], most: int | None = None) -> list[int]:
    """The chained key of each whole block of ``tokens`` (at most ``most`` blocks)."""
    keys: list[int] = []
    key = 0
    n = len(tokens) // block_tokens
    if most is not None:
        n = min(n, most)
    for i in range(n):
        key = hash((key, tuple(tokens[i * block_tokens : (i + 1) * block_tokens])))
        keys.append(key)
    return keys


class PrefixIndex:
    """The prefixes each node's cache should hold, by block key (one event loop; no locks)."""

    def __init__(self) -> None:
        self._held: dict[str, deque[list[int]]] = {}  # node -> its last jobs' keys, oldest first
        self._holders: dict[int, OrderedDict[str, int]] = {}  # key -> node -> jobs holding it

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, node_id: str, tokens: Sequence[int], slots: int) -> None:
        """The node just finished a job over ``tokens`` (prompt and answer); it keeps the last
        ``slots`` of them."""
        keys = block_keys(tokens)
        if not keys or slots < 1:
            return
        held = self._held.setdefault(node_id, deque())
        held.append(keys)
        for key in keys:
            nodes = self._holders.setdefault(key, OrderedDict())
            nodes[node_id] = nodes.get(node_id, 0) + 1
        while len(held) > slots:
            self._drop(node_id, held.popleft())

    def forget(self, node_id: str) -> None:
        """The node left (or restarted): its cache is gone."""
        for keys in self._held.pop(node_id, ()):
            self._drop(node_id, keys)

    def hits(self, keys: Sequence[int], *, most_tokens: int | None = None,
             least_tokens: int = block_tokens) -> dict[str, int]:
        """Per node, how many of the prompt's first tokens (``keys``: its block keys) its cache
        holds, in whole blocks, counted up to ``most_tokens``; nodes holding fewer than
        ``least_tokens`` are left out (so a prefix every node holds, a common system prompt, is
        never walked over the whole fleet)."""
        n = len(keys) if most_tokens is None else min(len(keys), most_tokens // block_tokens)
        found: dict[str, int] = {}
        for i in range(n - 1, -1, -1):
            tokens = (i + 1) * block_tokens
            if tokens < least_tokens:
                break
            nodes = self._holders.get(keys[i])
            if nodes:
                for node_id in nodes:
                    found.setdefault(node_id, tokens)
        return found

    def _drop(self, node_id: str, keys: list[int]) -> None:
        for key in keys:
            nodes = self._holders.get(key)
            if nodes is None:
                continue
            left = nodes.get(node_id, 0) - 1
            if left > 0:
                nodes[node_id] = left
            else:
                nodes.pop(node_id, None)
                if not nodes:
                    del self._holders[key]

"""The running batch's KV cache, left-padded: groups merge in, finished rows leave, rows move
out into a batch of their own (a chain's stage regroups its sequences this way).

Row i of every layer's keys and values holds one sequence, right-aligned; ``mask`` (rows x
columns, 1 for a real token) marks the real columns. Each sequence is fed its own position ids,
so the padding changes nothing it attends to: masked columns get exactly zero weight. Padded
columns are kept at exactly zero so that no stray value can leak in through ``0 * x``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sparecycles.errors import InvalidRequest, InvariantViolation


@dataclass(slots=True)
class KVBatch:
    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns), long, 1 where the column holds a real token

    def grow(self) -> torch.Tensor:
        """The attention mask for one decode step: every row gains one real column."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def zero_padding(self) -> None:
        """Set the keys and values of padded columns to exactly zero."""
        if bool(self.mask.all()):
            return
        padding = (self.mask == 0)[:, None, :, None]
        for layer, keys, values in _filled(self.cache):
            layer.keys = keys.masked_fill(padding, 0.0)
            layer.values = values.masked_fill(padding, 0.0)

    def merge(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's, left-padding the shorter to one width."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for (mine, keys, values), (_, their_keys, their_values) in zip(
            _filled(self.cache), _filled(other.cache), strict=True
        ):
            mine.keys = torch.cat([_pad_left(keys, width), _pad_left(their_keys, width)])
            mine.values = torch.cat([_pad_left(values, width), _pad_left(their_values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop columns that are padding in all of them,
        so that a long request leaving does not make everyone else attend over its length."""
        index, first = self._rows(rows)
        self.mask = self.mask.index_select(0, index)[:, first:]
        for layer, keys, values in _filled(self.cache):
            layer.keys = keys.index_select(0, index)[:, :, first:, :]
            layer.values = values.index_select(0, index)[:, :, first:, :]

    def take(self, rows: list[int]) -> KVBatch:
        """A new batch of copies of ``rows`` (in that order), trimmed as ``keep`` trims; this
        batch is left as it was (``keep`` the others to move the rows out)."""
        index, first = self._rows(rows)
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer, keys, values in _filled(self.cache):
            moved = copy.copy(layer)
            moved.keys = keys.index_select(0, index)[:, :, first:, :]
            moved.values = values.index_select(0, index)[:, :, first:, :]
            cache.layers.append(moved)
        return KVBatch(cache, self.mask.index_select(0, index)[:, first:])

    def _rows(self, rows: list[int]) -> tuple[torch.Tensor, int]:
        """The index of ``rows`` and the first column that is real in at least one of them."""
        if not rows:
            raise InvariantViolation("a batch cannot keep or take no rows")
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        first = int(self.mask.index_select(0, index).any(dim=0).nonzero()[0, 0])
        return index, first


def left_padded(
    prompts: list[tuple[int, ...]], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) for prompts of different lengths, right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def check_full_attention(config: Any, name: str) -> None:
    """Refuse models whose cache layers are not plain full attention (sliding windows, linear
    attention, ...): their layers keep state that left-padding and row selection would break."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise InvalidRequest(
            f"{name}: cache layers {sorted(kinds)} are not supported by the transformers engine,"
            " which batches full-attention models only"
        )


def filled_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a filled full-attention cache."""
    return [(keys, values) for _, keys, values in _filled(cache)]


def _filled(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Each layer of a batch's cache with its keys and values: full-attention layers only
    (``check_full_attention``), filled by the prefill that made the batch."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise InvariantViolation(f"a batch's cache holds an unfilled {type(layer).__name__}")
        out.append((layer, layer.keys, layer.values))
    return out


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (-1 for a mask, -2 for keys and values) on the left."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[-1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))

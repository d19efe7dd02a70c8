"""A KV cache with spare slots for the chunked estimator's probe blocks.

The preload forward fills it like a DynamicCache. After `freeze()`, each probe chunk writes its
keys into the slots [base, base + n) after the preloaded ones and reads the views [:base + n];
the next chunk overwrites them. So no chunk ever copies or concatenates the cache, and its
capacity is the batch's length plus one chunk's probe tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ProbeLayer(DynamicLayer):
    """One layer's K/V in a buffer of `capacity` slots.

    Before `freeze()` it fills like a DynamicLayer (the preload forward). After it, `update`
    writes the new keys at [base, base + n) of the rows in `rows` and returns views [:base + n]
    without moving `base`, which is what makes the next chunk overwrite this one.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.base = 0
        self.frozen = False
        self.rows = slice(None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buf = key_states.new_empty(b, h, self.capacity, d)
        self.value_buf = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.base + n
        if end > self.capacity:
            raise RuntimeError(f"probe cache overflow: {end} slots needed, {self.capacity} allocated")
        self.key_buf[self.rows, :, self.base : end] = key_states
        self.value_buf[self.rows, :, self.base : end] = value_states
        keys, values = self.key_buf[self.rows, :, :end], self.value_buf[self.rows, :, :end]
        if not self.frozen:
            self.base = end
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.base


class ProbeCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[ProbeLayer(capacity) for _ in range(num_layers)])

    def freeze(self) -> None:
        for layer in self.layers:
            layer.frozen = True

    def select_rows(self, rows: slice) -> None:
        for layer in self.layers:
            layer.rows = rows

    def set_base(self, base: int) -> None:
        """The next chunk writes its probe keys at [base, ...) and sees the cache up to there."""
        for layer in self.layers:
            layer.base = base

"""Counting what collectives move, for the estimator's benchmarks, tests and the GPU check.

`CollectiveCounter` wraps `torch.distributed`'s collectives and DeepSpeed's comm backend in this
process (no library code changed) and sums bytes per category; with `record_shapes` it also keeps
the shape of every tensor a collective carried, so a test can assert that no full-vocabulary
tensor was ever gathered.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

COLLECTIVE_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _wire_bytes(op: str, payload: int, world: int) -> float:
    """Bytes one rank sends in a ring implementation: all-reduce 2 (p-1)/p n (reduce-scatter then
    all-gather of n bytes), all-gather (p-1)/p n_out, reduce-scatter (p-1)/p n_in, broadcast n."""
    if world <= 1:
        return 0.0
    if op in ("all_reduce", "inference_all_reduce"):
        return 2 * (world - 1) / world * payload
    if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        return (world - 1) / world * payload
    return float(payload)


class CollectiveCounter:
    """Counts what collectives move, by wrapping them in this process (no library code changed).

    Two levels: DeepSpeed's comm backend (`deepspeed.comm.torch.TorchBackend`, which AutoTP's
    layers call, and whose `inference_all_reduce` may take a shared-memory kernel that never
    reaches torch.distributed), and `torch.distributed` itself (which the estimator calls). A call
    made inside a backend call is not counted again. Category: "estimator" when the caller's module
    is `iapo_openrlhf.*`; "lm_head" for DeepSpeed collectives while the LM head runs (forward
    hooks); "body" for the other DeepSpeed collectives (AutoTP's row-parallel all-reduces);
    "other" for the rest. Payload = bytes of the tensor reduced / gathered (the output for gathers).
    """

    def __init__(self, record_shapes: bool = False) -> None:
        self.enabled = False
        self.in_lm_head = False
        self.lm_head_rows = 0
        self._depth = 0
        self.records: dict[str, dict[str, Any]] = {}
        self.record_shapes = record_shapes
        self.shapes: list[tuple[str, str, tuple[int, ...]]] = []  # (category, op, shape) per tensor

    def reset(self) -> None:
        self.records, self.lm_head_rows, self.shapes = {}, 0, []

    def total(self, op_prefix: str = "", categories: tuple[str, ...] | None = None) -> int:
        """Payload bytes of the ops whose name starts with `op_prefix` (e.g. "all_gather")."""
        out = 0
        for category, rec in self.records.items():
            if categories is None or category in categories:
                out += sum(b for op, b in rec["op_bytes"].items() if op.startswith(op_prefix))
        return out

    def snapshot(self) -> dict[str, Any]:
        return dict(by_category=json.loads(json.dumps(self.records)), lm_head_rows=self.lm_head_rows)

    def _add(self, category: str, op: str, payload: int, world: int, args: tuple = (), kwargs: dict | None = None) -> None:
        rec = self.records.setdefault(category, dict(calls=0, payload_bytes=0, wire_bytes=0.0, ops={}, op_bytes={}))
        rec["calls"] += 1
        rec["payload_bytes"] += payload
        rec["wire_bytes"] += _wire_bytes(op, payload, world)
        rec["ops"][op] = rec["ops"].get(op, 0) + 1
        rec["op_bytes"][op] = rec["op_bytes"].get(op, 0) + payload
        if self.record_shapes:
            for t in _tensors((*args, *(kwargs or {}).values())):
                self.shapes.append((category, op, tuple(t.shape)))

    @staticmethod
    def _payload(op: str, args: tuple, kwargs: dict) -> int:
        if op == "all_gather":
            return _nbytes(kwargs.get("tensor_list", args[0] if args else None))
        if op == "all_gather_into_tensor":
            return _nbytes(kwargs.get("output_tensor", args[0] if args else None))
        if op == "reduce_scatter_tensor":
            return _nbytes(kwargs.get("input", args[1] if len(args) > 1 else None))
        return _nbytes(kwargs.get("tensor", args[0] if args else None))

    @staticmethod
    def _world(args: tuple, kwargs: dict) -> int:
        import torch.distributed as dist

        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        return dist.get_world_size(group) if dist.is_initialized() else 1

    def wrap_torch(self) -> None:
        import torch.distributed as dist

        for op in COLLECTIVE_OPS:
            original = getattr(dist, op, None)
            if original is None or getattr(original, "_iapo_counted", False):
                continue

            def wrapper(*args, _op=op, _original=original, **kwargs):
                if self.enabled and self._depth == 0:
                    caller = sys._getframe(1).f_globals.get("__name__", "")
                    category = "estimator" if caller.startswith("iapo_openrlhf") else "other"
                    self._add(category, _op, self._payload(_op, args, kwargs), self._world(args, kwargs), args, kwargs)
                return _original(*args, **kwargs)

            wrapper._iapo_counted = True
            setattr(dist, op, wrapper)

    def wrap_deepspeed(self) -> None:
        from deepspeed.comm.torch import TorchBackend

        for op in ("inference_all_reduce", *COLLECTIVE_OPS):
            original = getattr(TorchBackend, op, None)
            if original is None or getattr(original, "_iapo_counted", False):
                continue

            def method(backend, *args, _op=op, _original=original, **kwargs):
                if self.enabled and self._depth == 0:
                    category = "lm_head" if self.in_lm_head else "body"
                    payload_op = "all_reduce" if _op == "inference_all_reduce" else _op
                    self._add(category, _op, self._payload(payload_op, args, kwargs), self._world(args, kwargs), args,
                              kwargs)
                self._depth += 1
                try:
                    return _original(backend, *args, **kwargs)
                finally:
                    self._depth -= 1

            method._iapo_counted = True
            setattr(TorchBackend, op, method)

    def watch_lm_head(self, head: torch.nn.Module) -> None:
        def before(module, inputs):
            self.in_lm_head = True

        def after(module, inputs, output):
            self.in_lm_head = False
            if self.enabled:
                self.lm_head_rows += output.numel() // output.shape[-1]

        head.register_forward_pre_hook(before)
        head.register_forward_hook(after)

"""How one estimator call runs its forwards on the model as DeepSpeed holds it (DESIGN section 4).

The estimator gets whatever OpenRLHF's actor holds: a transformers model, or a DeepSpeed engine
with ZeRO-3 partitions, AutoTP shards and maybe a vocab-parallel LM head. `EstimatorSession` reads
that layout off the model and runs every forward of the call on it, with no second copy of the
weights:

- ZeRO-3: every partitioned parameter is gathered once for the whole call
  (`deepspeed.zero.GatheredParameters`), with DeepSpeed's per-module hooks detached while the
  preload and the probe chunks run, so the call all-gathers about one forward's worth of
  parameter bytes instead of one per chunk. If the gathered copy does not fit in free memory the
  session logs it once and keeps the hooks: each forward then gathers module by module, and every
  rank runs the same number of forwards (`forwards_to_match`).
- AutoTP: the ranks of a TP group run identical forwards; they compare a fingerprint of their
  batch first (`check_same_batch`), so a mismatch is an error instead of a hang.
- LM head: DeepSpeed 0.19.8's vocab-parallel head already returns this rank's slice of the
  vocabulary. Any other head under AutoTP (0.19.6's column-parallel head, which all-gathers full
  vocabulary logits, or a replicated tied head) is not called: the body runs alone and this
  rank's slice of the head weight is applied here. Entropies and log-probs are then reduced over
  the TP group from per-shard sums (`vocab_parallel.py`): no full-vocabulary tensor is gathered.

Every tensor that meets a collective lives on the model's device: NCCL refuses CPU tensors (gloo
accepts them, so CPU tests cannot catch that).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .entropy import entropy_from_logits, log_probs_from_logits
from .modeling import deepspeed_engine, hf_model, inference, text_config
from .vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs

logger = logging.getLogger(__name__)

# Share of the free memory left to the probe forwards when deciding whether ZeRO-3's gathered
# copy fits (the chunk size is then chosen from what is left).
PROBE_MEMORY_SHARE = 0.25
HEAD_MODES = ("model", "vocab_parallel", "sliced")
_warned_no_room = False


@dataclass(frozen=True)
class ParallelLayout:
    """How the model's weights are spread over ranks, as far as the estimator cares.

    tp_group: ranks that split every layer (AutoTP); they must run identical forwards.
    head: "model" (the model's own head, full logits), "vocab_parallel" (DeepSpeed's vocab-parallel
        head returns the slice [vocab_start, vocab_end)), "sliced" (the estimator applies this
        rank's slice [vocab_start, vocab_end) of the head weight to the body's output itself).
    zero_stage: 3 means parameters are partitioned over the data-parallel ranks.
    """

    tp_group: object | None = None
    tp_size: int = 1
    head: str = "model"
    vocab_start: int = 0
    vocab_end: int = 0
    zero_stage: int = 0

    @property
    def vocab_parallel(self) -> bool:
        return self.head != "model"


def _zero3_params(hf: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in hf.parameters() if hasattr(p, "ds_id")]


def _head_slice(head: torch.nn.Module, tp_group, tp_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary this rank's slice of `head` covers.

    DeepSpeed's column-parallel head (0.19.6 training-mode AutoTP, `gather_output=True`) already
    holds rows [sum(sizes[:i]), sum(sizes[:i + 1])) of the weight, sizes in `_partition_sizes`; a
    replicated head (tied embeddings) is split evenly here."""
    rank = getattr(head, "tp_index", None)
    rank = dist.get_rank(tp_group) if rank is None else rank
    sizes = getattr(head, "_partition_sizes", None)
    if getattr(head, "gather_output", False) and sizes is not None:
        return sum(sizes[:rank]), sum(sizes[: rank + 1])
    vocab = head.weight.ds_shape[0] if hasattr(head.weight, "ds_shape") else head.weight.shape[0]
    step = -(-vocab // tp_size)
    return min(vocab, rank * step), min(vocab, (rank + 1) * step)


def parallel_layout(model) -> ParallelLayout:
    """Detect AutoTP (any layer with a `mp_group` of size > 1), how the LM head is held and the
    ZeRO stage, from the engine or module itself."""
    hf = hf_model(model)
    tp_group, tp_size = None, 1
    for module in hf.modules():
        size = getattr(module, "tp_world_size", 1)
        if getattr(module, "mp_group", None) is not None and size > 1:
            tp_group, tp_size = module.mp_group, size
            break
    head = hf.get_output_embeddings()
    engine = deepspeed_engine(model)
    if engine is not None:
        zero = int(engine.zero_optimization_stage())
    else:
        zero = 3 if _zero3_params(hf) else 0
    if getattr(head, "is_vocab_parallel_lm_head", False):
        if tp_group is None:
            raise ValueError("model: the LM head is vocab-parallel but no tensor-parallel group was found on its layers")
        return ParallelLayout(tp_group, tp_size, "vocab_parallel", int(head.vocab_start_index),
                              int(head.vocab_end_index), zero)
    if tp_group is not None and isinstance(head, torch.nn.Module) and hasattr(head, "weight"):
        cfg = text_config(model)
        post = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling") if getattr(cfg, k, None)]
        if post:
            raise ValueError(
                f"model: its config sets {post}, applied after the LM head; under AutoTP the estimator applies "
                "each rank's slice of the head itself and would skip that, expected a model without it "
                "(or DeepSpeed >= 0.19.8 with tensor_parallel.vocab_parallel_lm_head)"
            )
        start, end = _head_slice(head, tp_group, tp_size)
        return ParallelLayout(tp_group, tp_size, "sliced", start, end, zero)
    return ParallelLayout(tp_group, tp_size, "model", 0, 0, zero)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: the driver's free memory plus what PyTorch's allocator holds
    unused; CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _DetachedHooks:
    """DeepSpeed ZeRO-3's module hooks taken out of their modules' hook dicts, and put back in
    their original order. While detached, a forward is a plain PyTorch forward: no per-module
    gather, no release, no trace bookkeeping and no collective."""

    def __init__(self, engine):
        offload = getattr(engine.optimizer, "parameter_offload", None) or engine.optimizer
        handles = [*getattr(offload, "forward_hooks", []), *getattr(offload, "backward_hooks", [])]
        if getattr(offload, "fwd_pre_hook", None) is not None:
            handles.append(offload.fwd_pre_hook)
        self.saved: list[tuple[dict, list]] = []
        seen: set[int] = set()
        for handle in handles:
            for ref in (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ())):
                hooks = ref()
                if hooks is not None and id(hooks) not in seen:
                    seen.add(id(hooks))
                    self.saved.append((hooks, list(hooks.items())))
        self.ids = {handle.id for handle in handles}

    def __enter__(self):
        for hooks, _ in self.saved:
            for key in self.ids & hooks.keys():
                del hooks[key]
        return self

    def __exit__(self, *exc):
        for hooks, items in self.saved:
            known = {k for k, _ in items}
            added = [(k, v) for k, v in hooks.items() if k not in known]  # registered meanwhile: keep
            hooks.clear()
            hooks.update((k, v) for k, v in items)
            hooks.update(added)
        return False


class EstimatorSession:
    """One estimator call's access to the model: inference mode, the ZeRO-3 gather, the LM head.

    Use as a context manager; inside it `forward` returns logits (this rank's vocabulary slice
    when `layout.vocab_parallel`) and `entropy` / `log_probs` reduce them over the TP group.
    """

    def __init__(self, model):
        self.model = model
        self.hf = hf_model(model)
        self.layout = parallel_layout(model)
        self.engine = deepspeed_engine(model)
        self.gathered = False  # ZeRO-3 parameters gathered for the whole call
        self._stack = contextlib.ExitStack()
        head = self.hf.get_output_embeddings()
        if self.layout.head == "sliced":
            self._head_params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
            self._head = head
            self._body = self.hf.get_decoder()

    @property
    def device(self) -> torch.device:
        p = next(self.hf.parameters())
        if p.device.type != "meta":
            return p.device
        # NCCL takes no CPU tensors: the collectives' device when the weights do not say.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def count_sync(self) -> bool:
        """Every forward is a collective (ZeRO-3 module hooks): ranks must run as many."""
        return self.layout.zero_stage == 3 and not self.gathered and dist.is_initialized() and dist.get_world_size() > 1

    def __enter__(self) -> "EstimatorSession":
        self._stack.enter_context(inference(self.model))
        if self.layout.zero_stage == 3 and self.engine is not None:
            self._gather_zero3()
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    # -- ZeRO-3 -------------------------------------------------------------------------------

    def _gather_zero3(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

        partitioned = [p for p in _zero3_params(self.hf) if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        need = sum(p.ds_numel * p.element_size() for p in partitioned)
        # The decision must be the same on every rank (the gather is a collective): the smallest
        # free memory decides, and IAPO_ZERO3_GATHER=never on any rank (-2) forces the fallback on
        # all, so that an environment set on some processes only cannot split them.
        never = os.environ.get("IAPO_ZERO3_GATHER", "auto") == "never"
        free = available_bytes(self.device)
        free_t = torch.tensor([-2 if never else free if free is not None else -1], dtype=torch.long, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(free_t, op=dist.ReduceOp.MIN)
        free = int(free_t)
        if free == -2 or (free >= 0 and need > (1 - PROBE_MEMORY_SHARE) * free):
            global _warned_no_room
            if not _warned_no_room:
                why = ("IAPO_ZERO3_GATHER=never is set on a rank" if free == -2 else
                       f"ZeRO-3's gathered parameters ({need / 1e9:.2f} GB on this rank) do not fit in "
                       f"{100 * (1 - PROBE_MEMORY_SHARE):.0f}% of the free memory ({free / 1e9:.2f} GB, smallest rank)")
                logger.warning("IAPO estimator: %s; falling back to gathering module by module in every probe forward "
                               "(slower: one parameter gather per chunk)", why)
                _warned_no_room = True
            return
        if partitioned:
            self._stack.enter_context(GatheredParameters(partitioned))
        self._stack.enter_context(_DetachedHooks(self.engine))
        self.gathered = True

    @contextlib.contextmanager
    def _head_gathered(self) -> Iterator[None]:
        """The sliced head's weight, gathered when ZeRO-3 holds it partitioned and the session did
        not gather everything (its module is never called, so no hook gathers it)."""
        if self.gathered or self.layout.zero_stage != 3 or not any(hasattr(p, "ds_id") for p in self._head_params):
            yield
            return
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(self._head_params):
            yield

    # -- forwards -----------------------------------------------------------------------------

    def forward(self, *, input_ids, attention_mask, position_ids, cache, keep) -> torch.Tensor:
        """Logits (R, K, V or V_local) at the kept columns: keep an int (the last K columns) or a
        1-D tensor of column indices (on the model's device)."""
        common = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        if self.layout.head != "sliced":
            return self.hf(**common, logits_to_keep=keep).logits
        hidden = self._body(**common).last_hidden_state
        hidden = hidden[:, -keep:] if isinstance(keep, int) else hidden[:, keep]
        start, end = self.layout.vocab_start, self.layout.vocab_end
        with self._head_gathered():
            weight, bias = self._head.weight, getattr(self._head, "bias", None)
            if not getattr(self._head, "gather_output", False):  # replicated: take this rank's rows
                weight = weight[start:end]
                bias = bias[start:end] if bias is not None else None
            return F.linear(hidden, weight, bias)

    def entropy(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.layout.vocab_parallel:
            return vocab_parallel_entropy(logits, self.layout.tp_group, temperature)
        return entropy_from_logits(logits, temperature)

    def log_probs(self, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.layout.vocab_parallel:
            lay = self.layout
            return vocab_parallel_log_probs(logits, labels, lay.vocab_start, lay.vocab_end, lay.tp_group, temperature)
        return log_probs_from_logits(logits, labels, temperature)

    # -- agreement between ranks --------------------------------------------------------------

    def check_same_batch(self, input_ids: torch.Tensor, key_valid: torch.Tensor, n_probes: int) -> None:
        """TP ranks run one model between them: a different batch on one rank would hang or corrupt
        every layer's collectives. Compare a fingerprint first and fail on every rank alike."""
        lay = self.layout
        if lay.tp_group is None:
            return
        ids = input_ids.long() * key_valid.long()
        weights = torch.arange(1, ids.shape[1] + 1, device=ids.device)
        # On the model's device: NCCL takes no CPU tensors.
        mine = torch.stack([
            torch.tensor(ids.shape[0], device=ids.device), torch.tensor(ids.shape[1], device=ids.device),
            torch.tensor(n_probes, device=ids.device), (ids * weights).sum(), key_valid.long().sum(),
        ])
        gathered = [torch.zeros_like(mine) for _ in range(lay.tp_size)]
        dist.all_gather(gathered, mine, group=lay.tp_group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            shapes = ", ".join(f"rank {r}: {tuple(g[:2].tolist())} tokens, {int(g[2])} probes" for r, g in enumerate(gathered))
            raise ValueError(
                f"sequences: tensor-parallel ranks hold different batches ({shapes}); every rank of a TP group "
                "must get the same samples (as OpenRLHF's actor does)"
            )

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the TP group. An automatic chunk size comes from each rank's
        own free memory and vocabulary slice; TP ranks must run the same forwards (every layer and
        the vocab-parallel reductions are collectives), so they take the smallest."""
        if self.layout.tp_group is None:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.layout.tp_group)
        return int(t)

    def forwards_to_match(self, mine: int) -> int:
        """With ZeRO-3's hooks active every forward gathers parameters over all ranks: the number
        of forwards the busiest rank runs, which every rank must run."""
        if not self.count_sync:
            return mine
        count = torch.tensor([mine], dtype=torch.long, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count)

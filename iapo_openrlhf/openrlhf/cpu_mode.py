"""`iapo-train-ray --cpu`: OpenRLHF's real Ray pipeline on a machine without a GPU.

Every CPU-only adjustment lives here and is active only in a `--cpu` run: the launcher starts Ray
with the environment variable `IAPO_CPU_MODE=1` and `ray_worker_setup` as Ray's
`worker_process_setup_hook`, so each Ray worker (policy, reference, trainer, vLLM actor) calls
`activate()` before it runs anything. vLLM runs the model outside the Ray actor: OpenRLHF's
AsyncLLMEngine always starts an engine-core process (vLLM V1 has no in-process async engine), and
on the CPU vLLM switches the "uni" executor OpenRLHF asks for to its multiprocessing one (it pins
OpenMP threads per worker), so the model and the worker extension live in a third process,
"VLLM::Worker". Both inherit the Ray actor's environment; the worker loads `CPUWorkerWrap`, whose
`init_process_group` applies the one patch it needs, the weight-sync group (OpenRLHF keeps
DeepSpeed out of vLLM's processes; the engine core needs nothing). Nothing here is imported by a
GPU run. OpenRLHF's and vLLM's code is reused, never copied: each patch wraps or
subclasses one of their objects, or rebinds a name in one of OpenRLHF's modules.

What a `--cpu` run does differently (README, "CPU mode"):
- Ray: a fresh local instance declaring fake GPUs (placement groups need them) and more CPUs than
  the machine has (OpenRLHF reserves one CPU per GPU bundle).
- OpenRLHF's modules see a `torch` whose `cuda` is the CPU (`current_device()` is the CPU device,
  `set_device` / `synchronize` / `current_stream` are no-ops); DeepSpeed runs on its CPU
  accelerator with gloo; the device mesh is a CPU mesh.
- Weight sync: a gloo group (vLLM's `stateless_init_torch_distributed_process_group`) replaces
  vLLM's NCCL communicator, and the vLLM worker loads the whole state dict at once through
  `reload_weights` (vLLM-CPU repacks linear weights, so per-tensor `load_weights` cannot work),
  then re-packs the LM head. After each sync, rank 0 compares vLLM's log-probs of a probe text
  with the actor's: a sync that did nothing fails the run instead of training on stale rollouts.
- vLLM: eager mode, no chunked prefill, one seed per request, samples taken in the order of the prompts
  (reproducible rollouts and PPO steps); sdpa attention for the
  DeepSpeed models; no colocation, no sleep mode. DeepSpeed: no shared-memory all-reduce op.
- At the end: Ray shut down, and any process of the run still alive ended (by its run id).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import types
from importlib import import_module
from typing import Any

import torch

from . import cpu_stubs

ENV = "IAPO_CPU_MODE"
EVENTS_ENV = "IAPO_CPU_EVENTS"  # the run's event log (JSON lines): phases, weight-sync checks
RUN_ID_ENV = "IAPO_CPU_RUN_ID"  # tells this run's events from a resumed run's in the same file
EVENTS_FILE = "cpu_run_events.jsonl"  # under --ckpt.path
PROBE_TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
PROBE_TOKENS = 32
# Largest |log p_vLLM - log p_actor| over the probe tokens accepted right after a sync. Both sides
# hold the same bf16 weights; what remains is bf16 rounding in two different kernels (about 0.002
# on the tiny model: README, "CPU mode").
SYNC_TOLERANCE = 0.25
# A gap between vLLM and the actor before a sync (nats, 5x the bf16 rounding) that the sync must
# close: vLLM's log-probs must then change.
STALE = 1e-2

# flash_attn has no CPU build and OpenRLHF imports it at module level: the pure-torch stand-in
# (padding helpers only; attention runs in sdpa). vLLM must be the real vllm-cpu (checked by the
# launcher), so `install` leaves it alone when it is installed.
cpu_stubs.install()

_ACTIVE = False


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def record_event(name: str, **fields) -> None:
    """Append one event to the run's log (every process of a --cpu run; a no-op outside one)."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    row = {"event": name, "time": time.time(), "run": os.environ.get(RUN_ID_ENV), "pid": os.getpid(), **fields}
    with open(path, "a", encoding="utf-8") as f:  # one short write per line: appends do not interleave
        f.write(json.dumps(row) + "\n")


# ── torch.cuda as OpenRLHF's modules see it ──


class _CudaOnCPU:
    """`torch.cuda` for OpenRLHF's modules in a --cpu run: the "current CUDA device" is the CPU.

    OpenRLHF moves batches to `torch.cuda.current_device()`, and calls `synchronize`,
    `set_device`, `current_stream` and `empty_cache` around its steps; on a CPU build of torch
    each of those raises. Anything else is the real `torch.cuda`."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(device=None):
        return None

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


def _device_cuda_to_cpu(spec, *args):
    """`torch.device` for the replay buffer module: it builds f"cuda:{current_device()}"."""
    if isinstance(spec, str) and spec.startswith("cuda"):
        return torch.device("cpu")
    return torch.device(spec, *args)


class _TorchOnCPU(types.ModuleType):
    """The real torch, except `torch.cuda` (and, where asked, `torch.device("cuda...")`)."""

    def __init__(self, cuda_devices_to_cpu: bool = False):
        super().__init__("torch")
        self._cuda_devices_to_cpu = cuda_devices_to_cpu
        self.cuda = _CudaOnCPU()
        if cuda_devices_to_cpu:
            self.device = _device_cuda_to_cpu

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def __reduce__(self):
        # Ray pickles some of OpenRLHF's methods by value (tracing wrappers of actor methods),
        # globals included: rebuild the view on the other side.
        return (_TorchOnCPU, (self._cuda_devices_to_cpu,))


def _barrier_without_cuda_sync() -> None:
    """openrlhf.utils.distributed_util.torch_dist_barrier_and_cuda_sync without the CUDA sync."""
    torch.distributed.barrier()


def _cpu_device_mesh(device_type, *args, **kwargs):
    # DeepspeedStrategy.setup_distributed builds its (dp, sp, tp) mesh with device_type "cuda".
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", *args, **kwargs)


class GlooWeightGroup:
    """What OpenRLHF's weight sync calls `.broadcast(tensor, src=0, stream=...)` on, over gloo.

    OpenRLHF's `stateless_init_process_group` always builds vLLM's NCCL communicator (whatever
    --vllm.sync_backend says); without NCCL that communicator disables itself and its broadcast
    returns without moving a byte. A gloo process group moves CPU tensors."""

    def __init__(self, group):
        self.group = group

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream=None) -> None:
        self.group.broadcast(tensor, src).wait()


def stateless_gloo_group(master_address, master_port, rank, world_size, device=None) -> GlooWeightGroup:
    """Drop-in for openrlhf.utils.distributed_util.stateless_init_process_group, over gloo."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    group = stateless_init_torch_distributed_process_group(
        master_address, int(master_port), rank, world_size, backend="gloo"
    )
    return GlooWeightGroup(group)


def activate() -> None:
    """Apply the CPU patches in this process (idempotent). Called by Ray's setup hook in every
    worker of a --cpu run and by the launcher (the vLLM worker patches only its sync group)."""
    global _ACTIVE
    if _ACTIVE:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # import_module, not `import a.b.c as m`: that form returns attribute c of a.b, and in
    # deepspeed.comm (for one) the attribute `torch` is the torch package, not the submodule.
    replay_buffer = import_module("openrlhf.trainer.ppo_utils.replay_buffer")
    launcher = import_module("openrlhf.trainer.ray.launcher")
    ppo_actor = import_module("openrlhf.trainer.ray.ppo_actor")
    ppo_critic = import_module("openrlhf.trainer.ray.ppo_critic")
    ds_strategy = import_module("openrlhf.utils.deepspeed.deepspeed")
    ds_utils = import_module("openrlhf.utils.deepspeed.deepspeed_utils")
    distributed_util = import_module("openrlhf.utils.distributed_util")
    ds_comm_torch = import_module("deepspeed.comm.torch")
    samples_generator = import_module("openrlhf.trainer.ppo_utils.samples_generator")

    # OpenRLHF's torch.cuda.* calls (device moves, set_device, synchronize, streams) in the
    # modules that make them; torch itself, DeepSpeed and vLLM keep the real torch.
    for module in (ppo_actor, ppo_critic, launcher, ds_strategy, ds_utils):
        module.torch = _TorchOnCPU()
    # NaiveReplayBuffer.__init__ builds torch.device(f"cuda:{torch.cuda.current_device()}").
    replay_buffer.torch = _TorchOnCPU(cuda_devices_to_cpu=True)
    # The device mesh of DeepspeedStrategy.setup_distributed: a CPU mesh over the gloo group.
    ds_strategy.init_device_mesh = _cpu_device_mesh
    # Barrier + torch.cuda.synchronize (imported by name into the modules that call it).
    for module in (distributed_util, ppo_actor, ds_strategy):
        module.torch_dist_barrier_and_cuda_sync = _barrier_without_cuda_sync
    # Weight sync group: gloo instead of vLLM's NCCL communicator, on both sides (the vLLM
    # worker imports it from distributed_util when OpenRLHF asks it to join the group).
    distributed_util.stateless_init_process_group = stateless_gloo_group
    ppo_actor.stateless_init_process_group = stateless_gloo_group
    # PolicyModelActor builds its ActorPPOTrainer by this module-level name: add the sync check.
    ppo_actor.ActorPPOTrainer = _get("CPUActorPPOTrainer")
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op in every process that
    # initialises it (30-65 s on 2 cores, rebuilt whenever another venv used the shared torch
    # extension cache). It only speeds up all-reduce between processes; without it DeepSpeed
    # uses torch.distributed's gloo all-reduce.
    ds_comm_torch.build_shm_op = _no_shm_op
    # SamplesGenerator takes each prompt's samples as its vLLM call finishes (ray.wait), so the
    # batch order, and with it the micro-batches and float sums of the PPO step, follows the
    # engine's timing: two runs on the same seeds differed in the last bits (CI, under load).
    samples_generator.ray = _RayWaitInOrder()
    _ACTIVE = True
    record_event("cpu_mode_active")


def _no_shm_op():
    return None


class _RayWaitInOrder:
    """`ray`, except that `wait` reports the pending refs in the order they were submitted."""

    def __getattr__(self, name: str):
        return getattr(import_module("ray"), name)

    @staticmethod
    def wait(refs: list, num_returns: int = 1, timeout: float | None = None, **kwargs) -> tuple[list, list]:
        assert num_returns == 1, "SamplesGenerator waits for one ref at a time"
        ready, _ = import_module("ray").wait(refs[:1], num_returns=1, timeout=timeout, **kwargs)
        return (ready, list(refs[1:])) if ready else ([], list(refs))


def ray_worker_setup() -> None:
    """Ray's `worker_process_setup_hook` for a --cpu run (runs in every Ray worker at start)."""
    if enabled():
        activate()


# ── DeepSpeed strategy ──


def _strategy_class():
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    class CPUDeepspeedStrategy(DeepspeedStrategy):
        """OpenRLHF's strategy: the EMA copy stays on the CPU (ppo_actor passes "cuda"), and model
        set-up, checkpoint and export times go to the run's event log (the phase table)."""

        def moving_average(self, model, model_ema, beta=0.992, device="cpu"):
            return super().moving_average(model, model_ema, beta, "cpu")

        def get_ds_train_config(self, optim_dict=None, **kwargs):
            # torch's AdamW instead of DeepSpeed's FusedAdam: on the CPU accelerator FusedAdam is a
            # C++ op JIT-compiled at the first run (minutes on 2 cores, in a lock file that a killed
            # compile leaves behind and every later run then waits on forever).
            ds_config = super().get_ds_train_config(optim_dict, **kwargs)
            if ds_config.get("optimizer", {}).get("type") in ("Adam", "AdamW"):
                ds_config["optimizer"]["params"]["torch_adam"] = True
            return ds_config

        def setup_distributed(self, *args, **kwargs):
            record_event("model_init_start", rank=_rank())
            return super().setup_distributed(*args, **kwargs)

        def prepare(self, *models, **kwargs):
            out = super().prepare(*models, **kwargs)
            kind = "train" if any(isinstance(m, tuple) for m in models) else "eval"
            trained = [o for o in (out if isinstance(out, list) else [out]) if isinstance(o, tuple) and o[1] is not None]
            # the optimizer under ZeRO's wrapper: torch's AdamW (get_ds_train_config), not FusedAdam
            optimizers = sorted({type(getattr(o[1], "optimizer", o[1])).__name__ for o in trained})
            record_event("model_prepared", kind=kind, rank=_rank(), optimizers=optimizers)
            return out

        def load_ckpt(self, model, load_dir, *args, **kwargs):
            load_path, states = super().load_ckpt(model, load_dir, *args, **kwargs)
            record_event("checkpoint_loaded", rank=_rank(), path=str(load_path),
                         global_step=(states or {}).get("global_step"))
            return load_path, states

        def save_ckpt(self, model, save_dir, tag=None, *args, **kwargs):
            t0 = time.time()
            out = super().save_ckpt(model, save_dir, tag, *args, **kwargs)
            record_event("checkpoint_saved", rank=_rank(), tag=tag, seconds=time.time() - t0)
            return out

        def save_model(self, model, tokenizer, output_dir, *args, **kwargs):
            t0 = time.time()
            out = super().save_model(model, tokenizer, output_dir, *args, **kwargs)
            record_event("hf_saved", rank=_rank(), path=str(output_dir), seconds=time.time() - t0)
            return out

    CPUDeepspeedStrategy.__module__ = __name__
    CPUDeepspeedStrategy.__qualname__ = "CPUDeepspeedStrategy"
    return CPUDeepspeedStrategy


def get_strategy(args):
    """openrlhf.utils.get_strategy's strategy, as the CPU subclass (pickled to every Ray worker).
    The subclass adds no state, only the one method above, so the class is swapped in place."""
    from openrlhf.utils import get_strategy as openrlhf_get_strategy

    strategy = openrlhf_get_strategy(args)
    strategy.__class__ = _get("CPUDeepspeedStrategy")
    return strategy


# ── the weight-sync check (policy actor side) ──


def _cpu_actor_trainer_class():
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    class CPUActorPPOTrainer(ActorPPOTrainer):
        """OpenRLHF's actor trainer plus a check of every weight sync: the log-probs of a probe
        text under vLLM (before and after the sync) and under the actor (`check_sync`)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The state the first sync starts from: vLLM loaded the model from disk, the actor
            # too (or a checkpoint, when resuming).
            self._iapo_probe = self._probe_ids()
            self._iapo_actor_last = self._actor_log_probs(self._iapo_probe)
            vllm = self._vllm_log_probs(self._iapo_probe)
            if vllm is not None:
                record_event("actor_ready", rank=_rank(),
                             max_abs_diff_vllm_actor=[float((v - self._iapo_actor_last).abs().max()) for v in vllm])

        def broadcast_to_vllm(self):
            ids = self._iapo_probe
            before = self._vllm_log_probs(ids)
            t0 = time.time()
            super().broadcast_to_vllm()
            seconds = time.time() - t0
            after = self._vllm_log_probs(ids)
            actor = self._actor_log_probs(ids)
            if before is not None:  # rank 0
                check_sync(before, after, actor, self._iapo_actor_last, seconds)
            self._iapo_actor_last = actor

        def _probe_ids(self) -> list[int]:
            ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
            return list(ids[:PROBE_TOKENS])

        def _vllm_log_probs(self, ids: list[int]):
            """Each engine's log p(token_i | tokens_<i) of the probe (prompt log-probs); rank 0
            only (it is the member of the sync group), None elsewhere."""
            if torch.distributed.get_rank() != 0:
                return None
            import ray
            from vllm import SamplingParams

            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            outputs = ray.get([engine.generate.remote(ids, params) for engine in self.vllm_engines])
            return [
                torch.tensor([step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])])
                for out in outputs
            ]

        @torch.no_grad()
        def _actor_log_probs(self, ids: list[int]) -> torch.Tensor:
            """The same under the DeepSpeed actor (every rank: ZeRO-3 gathers inside forward)."""
            was_training = self.actor.training
            self.actor.eval()
            try:
                seq = torch.tensor([ids])
                logits = self.actor.model(seq, attention_mask=torch.ones_like(seq)).logits.float()
            finally:
                self.actor.train(was_training)
            return logits[0, :-1].log_softmax(-1).gather(-1, seq[0, 1:, None]).squeeze(-1)

    CPUActorPPOTrainer.__module__ = __name__
    CPUActorPPOTrainer.__qualname__ = "CPUActorPPOTrainer"
    return CPUActorPPOTrainer


class WeightSyncError(RuntimeError):
    pass


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check_sync(before, after, actor: torch.Tensor, actor_last: torch.Tensor, seconds: float) -> dict[str, Any]:
    """One sync, judged on the probe's log-probs: `before` / `after` (one tensor per vLLM engine),
    `actor` now and `actor_last` at the previous sync or start-up (recorded for the log). Records
    it as an event and raises WeightSyncError when, for an engine,
    - vLLM differed from the actor by more than STALE before the sync (the actor took a step, or a
      checkpoint was loaded) and its log-probs did not change at all: the sync moved nothing
      (e.g. a communicator that silently disabled itself), or
    - after the sync it still differs from the actor by more than SYNC_TOLERANCE."""
    record = {
        "sync_seconds": round(seconds, 3),
        "actor_moved": _max_abs(actor, actor_last),
        "vllm_moved": [_max_abs(a, b) for a, b in zip(after, before)],
        "max_abs_diff_before": [_max_abs(b, actor) for b in before],
        "max_abs_diff_after": [_max_abs(a, actor) for a in after],
        "probe_tokens": int(actor.numel()),
    }
    print(f"iapo-train-ray --cpu: weight sync check {json.dumps(record)}", flush=True)
    record_event("weight_sync", rank=_rank(), **record)
    rows = zip(record["max_abs_diff_before"], record["vllm_moved"], record["max_abs_diff_after"])
    for engine, (gap, moved, diff) in enumerate(rows):
        if gap > STALE and moved == 0.0:
            raise WeightSyncError(
                f"vLLM engine {engine}: its log-probs differed from the actor's by {gap:.3g} before the weight sync "
                "and did not change at all: the weight sync did not reach vLLM"
            )
        if not math.isfinite(diff) or diff > SYNC_TOLERANCE:
            raise WeightSyncError(
                f"vLLM engine {engine}: after the weight sync its log-probs differ from the actor's by up to {diff:.3g} "
                f"(tolerance {SYNC_TOLERANCE}): vLLM does not hold the actor's weights"
            )
    return record


# ── vLLM: the engine actor and its worker extension ──


_VLLM_TOKEN_BUDGET = 2048  # vLLM's default step budget outside its CPU LLM-class preset


def vllm_engine_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The vLLM engine arguments of a CPU-mode engine: OpenRLHF's, eager and without chunked prefill.

    Chunked prefill splits a prompt that does not fit the step's token budget over engine steps and
    rewinds that request's seeded generator for the token it samples and discards (`set_offset`, a
    CUDA-generator operation): with the per-request seeds below, a CPU generator raises "CPU
    Generator does not use offset". Without chunking a prompt is prefilled whole, so the budget must
    hold the longest sequence (vLLM checks it)."""
    kwargs = dict(kwargs, enforce_eager=True, enable_chunked_prefill=False)
    kwargs["max_num_batched_tokens"] = max(
        kwargs.get("max_num_batched_tokens") or 0, kwargs.get("max_model_len") or 0, _VLLM_TOKEN_BUDGET
    )
    return kwargs


def _rollout_actor_class():
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    class CPURolloutRayActor(RolloutRayActor.__ray_actor_class__):  # the class behind @ray.remote
        """OpenRLHF's vLLM engine actor with the CPU worker extension and eager execution.

        create_vllm_engines hard-codes OpenRLHF's WorkerWrap (CUDA tensors, per-tensor
        load_weights) and leaves CUDA graphs on by default; vLLM-CPU needs neither."""

        async def __init__(self, *args, **kwargs):
            t0 = time.time()
            activate()
            kwargs = vllm_engine_kwargs(kwargs)
            kwargs["worker_extension_cls"] = f"{__name__}.CPUWorkerWrap"
            self._iapo_seed_base = int(kwargs.get("seed") or 0) * 1_000_003
            self._iapo_requests = 0
            await super().__init__(*args, **kwargs)
            record_event("vllm_ready", seconds=time.time() - t0)

        async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
            # Reproducible rollouts: OpenRLHF samples from the engine's one global generator, so
            # the tokens depend on how the asynchronously arriving requests fall into engine
            # steps. A seed per request (engine seed, request number: the order in which
            # OpenRLHF's executors call this, fixed for a given run) makes them depend on that
            # request only.
            if sampling_params.seed is None and sampling_params.temperature > 0:
                sampling_params = copy.deepcopy(sampling_params)
                sampling_params.seed = (self._iapo_seed_base + self._iapo_requests) % (2**31)
                self._iapo_requests += 1
            return await super().generate(prompt_token_ids, sampling_params, multi_modal_data)

        async def iapo_reset_request_seeds(self):
            """The next request gets the first seed again: an engine reused for another run
            (--methods) samples that run's rollouts as a freshly started engine would."""
            self._iapo_requests = 0

    CPURolloutRayActor.__module__ = __name__
    CPURolloutRayActor.__qualname__ = "CPURolloutRayActor"
    return CPURolloutRayActor


def _worker_wrap_class():
    from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

    class CPUWorkerWrap(WorkerWrap):
        """OpenRLHF's vLLM worker extension, receiving weights over gloo into CPU tensors.

        vLLM-CPU repacks linear weights after loading and leaves empty parameters, so the
        per-tensor `model.load_weights` of OpenRLHF's `update_weight` fails; the tensors of one
        sync are kept until the last one (OpenRLHF flags it `empty_cache=True`) and loaded at
        once through `reload_weights`, which re-runs vLLM's post-load processing."""

        def init_process_group(self, *args, **kwargs):
            # OpenRLHF's WorkerWrap takes stateless_init_process_group from this module at call
            # time: the gloo group. (Only this patch: the rest of activate() would import
            # DeepSpeed and OpenRLHF's trainer into vLLM's worker for nothing.)
            distributed_util = import_module("openrlhf.utils.distributed_util")

            distributed_util.stateless_init_process_group = stateless_gloo_group
            record_event("cpu_mode_active", scope="vllm worker: weight-sync group")
            super().init_process_group(*args, **kwargs)
            self._iapo_pending = []

        def update_weight(self, name, dtype, shape, empty_cache=False):
            assert dtype == self.model_config.dtype, f"mismatch dtype: src {dtype}, dst {self.model_config.dtype}"
            weight = torch.empty(shape, dtype=dtype)
            self._model_update_group.broadcast(weight, src=0)
            self._iapo_pending.append((name, weight))
            if empty_cache:  # OpenRLHF's marker of the last parameter of this sync
                self._iapo_load_pending()

        def _iapo_load_pending(self):
            weights, self._iapo_pending = self._iapo_pending, []
            self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
            # A tied LM head shares the embedding's weight but keeps its own packed copy for
            # the CPU GEMM; nothing is loaded under its name, so vLLM does not re-pack it.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            lm_head = getattr(self.model_runner.get_model(), "lm_head", None)
            if lm_head is not None and getattr(lm_head, "weight", None) is not None and lm_head.weight.numel():
                dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)

    CPUWorkerWrap.__module__ = __name__
    CPUWorkerWrap.__qualname__ = "CPUWorkerWrap"
    return CPUWorkerWrap


# The classes are built on first use (each needs OpenRLHF, whose import is heavy), once per
# process: pickles name them as attributes of this module (module __getattr__ below).
_FACTORIES = {
    "CPUDeepspeedStrategy": _strategy_class,
    "CPUActorPPOTrainer": _cpu_actor_trainer_class,
    "CPURolloutRayActor": _rollout_actor_class,
    # what create_vllm_engines instantiates (.options(...).remote(...))
    "CPURolloutRayActorRemote": lambda: __import__("ray").remote(_get("CPURolloutRayActor")),
    "CPUWorkerWrap": _worker_wrap_class,
}


def _get(name: str):
    if name not in globals():
        globals()[name] = _FACTORIES[name]()
    return globals()[name]


def __getattr__(name: str):
    if name not in _FACTORIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _get(name)


# ── the launcher side (the driver process of `iapo-train-ray --cpu`) ──


class CPUModeError(Exception):
    """An option --cpu cannot run: one line, exit code 2."""


CPU_ATTENTION = ("sdpa", "eager")
MAX_VLLM_MEMORY_SHARE = 0.5


def _given(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def check_args(args, argv: list[str]) -> list[str]:
    """Refuse, one line each, what cannot run on the CPU; adjust the rest. Returns the notes to
    print for the adjustments. `args`: OpenRLHF's hierarchised args after its own checks;
    `argv`: the options as given (to tell an explicit value from OpenRLHF's default)."""
    refusals = [
        (args.train.colocate_all, "--train.colocate_all: colocation syncs weights by CUDA IPC and puts vLLM to sleep, "
                                  "neither exists on the CPU; drop it (cluster.colocate_all: false in a config)"),
        # OpenRLHF itself turns --vllm.enable_sleep off without --train.colocate_all: look at argv too.
        (args.vllm.enable_sleep or _given(argv, "--vllm.enable_sleep"), "--vllm.enable_sleep: vLLM-CPU has no sleep "
                                                                         "mode; drop it"),
        (args.ds.enable_sleep, "--ds.enable_sleep: offloading DeepSpeed states to the CPU is meaningless on the CPU; "
                               "drop it"),
        (args.ds.ring_attn_size > 1, f"--ds.ring_attn_size {args.ds.ring_attn_size}: ring attention needs flash-attn "
                                     "(GPU only); use 1 with --cpu"),
        (args.ds.packing_samples, "--ds.packing_samples: OpenRLHF runs packed samples through flash-attn's varlen "
                                  "kernels (GPU only); drop it with --cpu"),
        (args.vllm.sync_with_ray, "--vllm.sync_with_ray: ray.util.collective has no CPU backend installed here; "
                                  "drop it (--cpu syncs weights over a gloo group)"),
        (args.vllm.tensor_parallel_size > 1, f"--vllm.tensor_parallel_size {args.vllm.tensor_parallel_size}: "
                                             "--cpu runs each vLLM engine in one process; use 1"),
        (args.ds.use_liger_kernel, "--ds.use_liger_kernel: Liger's kernels are Triton GPU kernels; drop it with --cpu"),
        (args.ds.load_in_4bit, "--ds.load_in_4bit: bitsandbytes 4-bit needs CUDA; drop it with --cpu"),
        (args.ds.param_dtype != "bf16", f"--ds.param_dtype {args.ds.param_dtype}: OpenRLHF's vLLM engines are bf16 "
                                        "and weights are synced as they are (and DeepSpeed's CPU accelerator has fp16 "
                                        "only on CPUs with AVX512-FP16); use bf16 with --cpu"),
        (not args.vllm.num_engines, "--vllm.num_engines 0: OpenRLHF 0.11 samples with vLLM; use 1 with --cpu"),
        (args.vllm.gpu_memory_utilization > MAX_VLLM_MEMORY_SHARE,
         f"--vllm.gpu_memory_utilization {args.vllm.gpu_memory_utilization}: on the CPU vLLM reserves this share of "
         f"the machine's whole memory for its KV cache; use at most {MAX_VLLM_MEMORY_SHARE} (0.05 is plenty for a "
         "tiny model; cluster.vllm_gpu_memory_utilization in a config)"),
    ]
    attn = args.ds.attn_implementation
    if _given(argv, "--ds.attn_implementation") and attn not in CPU_ATTENTION:
        refusals.append((True, f"--ds.attn_implementation {attn}: not available on the CPU; use one of "
                               f"{list(CPU_ATTENTION)} (or leave it out: --cpu uses sdpa)"))
    for refused, message in refusals:
        if refused:
            raise CPUModeError(message)
    notes = []
    if attn not in CPU_ATTENTION:
        args.ds.attn_implementation = "sdpa"
        notes.append(f"attention sdpa instead of OpenRLHF's default {attn}")
    args.vllm.enforce_eager = True
    args.vllm.sync_backend = "gloo"
    notes.append("vLLM in eager mode; weights synced to vLLM over gloo")
    return notes


def _fake_gpus(args) -> int:
    from .launch import resource_layout

    return sum(row["gpus"] for row in resource_layout(args) if row["shares"] is None)


def start_ray(args, env_vars: dict[str, str]) -> bool:
    """Connect to RAY_ADDRESS if set, else start a fresh local Ray with the fake GPUs the layout
    needs. Returns True when the instance is ours (to shut down at the end)."""
    import ray

    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": f"{__name__}.ray_worker_setup"}
    if os.environ.get("RAY_ADDRESS"):
        # The user's cluster: it must declare the GPU resources OpenRLHF's placement groups ask for.
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
        return False
    gpus = _fake_gpus(args)
    # address="local": a new instance even if another Ray runs on this machine (it would lack the
    # fake GPUs). Each OpenRLHF actor reserves a CPU per GPU, plus the trainer: declare more CPUs
    # than the machine has; the OS shares the real cores.
    ray.init(address="local", num_cpus=gpus + 2, num_gpus=gpus, include_dashboard=False,
             runtime_env=runtime_env, object_store_memory=512 * 1024**2)
    return True


@contextlib.contextmanager
def session(args, env_vars: dict[str, str], events_dir: str | None = None):
    """The driver's side of a --cpu run: environment, Ray, OpenRLHF's driver-side names, and the
    phase table at the end. Yields; the caller runs OpenRLHF's train(args) inside (once, or once
    per method with --methods). The event log goes to events_dir (default: --ckpt.path)."""
    import ray
    from unittest import mock

    import openrlhf.cli.train_ppo_ray as orl_cli
    import openrlhf.trainer.ray.vllm_engine as vllm_engine

    events_dir = events_dir or args.ckpt.path
    os.makedirs(events_dir, exist_ok=True)
    events_path = os.path.abspath(os.path.join(events_dir, EVENTS_FILE))
    run_id = f"{os.getpid()}-{time.time():.0f}"
    env = {**env_vars, ENV: "1", EVENTS_ENV: events_path, RUN_ID_ENV: run_id, "DS_ACCELERATOR": "cpu"}
    os.environ.update(env)
    import psutil

    record_event("launch", process_started=psutil.Process().create_time())
    activate()
    ours = start_ray(args, env)
    record_event("ray_ready")
    try:
        # In this process train() builds the strategy (pickled to every worker) and the vLLM
        # engine actors; both come from the names below.
        with mock.patch.object(orl_cli, "get_strategy", get_strategy), \
                mock.patch.object(vllm_engine, "RolloutRayActor", _get("CPURolloutRayActorRemote")):
            yield
        record_event("train_done")
    finally:
        if ours:
            ray.shutdown()
            ended = end_leftover_processes(run_id)
            record_event("ray_stopped", **ended)
            if ended["killed"]:
                print(f"iapo-train-ray --cpu: killed {len(ended['killed'])} process(es) of this run that ignored SIGTERM "
                      f"after Ray's shutdown: {ended['killed']}", file=sys.stderr)
    print(phase_table(read_events(events_path, run_id)), file=sys.stderr)


def _processes_of_run(run_id: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_ID_ENV) == run_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def end_leftover_processes(run_id: str, wait: float = 3.0, grace: float = 10.0) -> dict[str, list[int]]:
    """End the processes of this run (their environment holds its run id) still alive `wait` s
    after Ray's shutdown: SIGTERM, then SIGKILL for those alive `grace` s later. Ray stops its
    workers, but vLLM's engine-core and worker processes are children of a Ray worker and exit
    some seconds later, or never: they survived a killed raylet here (1.7 GB held until ended by
    hand). Returns {"terminated": pids, "killed": pids}."""
    import psutil

    deadline = time.time() + wait
    left = _processes_of_run(run_id)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return {"terminated": [p.pid for p in left], "killed": [p.pid for p in alive]}


def read_events(path: str, run_id: str | None = None) -> list[dict[str, Any]]:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if run_id is None or r.get("run") == run_id]


def _method_phases(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """--methods: launcher and Ray as in `phases`, then for each method its start-up (the first:
    Ray workers, vLLM, models; the others: their own actor, reference and trainer processes and the
    sync of their initial weights to the reused vLLM engine), its steps and its total."""
    rows = [row for row in phases([e for e in events if e["event"] in ("launch", "ray_ready")])]
    starts = [e for e in events if e["event"] == "method_start"]
    dones = [e for e in events if e["event"] == "method_done"]
    for k, start in enumerate(starts):
        method, t0 = start["method"], start["time"]
        t1 = dones[k]["time"] if k < len(dones) else (starts[k + 1]["time"] if k + 1 < len(starts) else math.inf)
        seg = [e for e in events if t0 <= e["time"] <= t1]
        syncs = [e["time"] for e in seg if e["event"] == "weight_sync"]
        reset = [e["time"] for e in seg if e["event"] == "vllm_reset"]
        if reset:
            after = [t for t in syncs if t >= reset[0]]
            begin, steps = (after[0], after[1:]) if after else (None, [])
            what = "own actor, reference and trainer processes; initial weights synced to the reused vLLM"
        else:
            ready = [e["time"] for e in seg if e["event"] in ("vllm_ready", "model_prepared", "actor_ready")]
            begin, steps = (max(ready) if ready else None), syncs
            what = "Ray workers, vLLM engine, models"
        if begin is not None:
            rows.append((f"{method}: start-up ({what})", begin - t0))
            for n, (lo, hi) in enumerate(zip([begin, *steps], steps), start=1):
                saved = sum(e["seconds"] for e in seg if e["event"] in ("checkpoint_saved", "hf_saved")
                            and e.get("rank", 0) == 0 and lo <= e["time"] <= hi)
                rows.append((f"{method}: step {n} (without saves)", hi - lo - saved))
        if math.isfinite(t1):
            rows.append((f"{method}: total (start-up, steps, saves, HF export)", t1 - t0))
    first = {e["event"]: e for e in reversed(events)}
    if "train_done" in first and "ray_stopped" in first:
        rows.append(("Ray shutdown", first["ray_stopped"]["time"] - first["train_done"]["time"]))
    end = first.get("ray_stopped", first.get("train_done"))
    if "launch" in first and end:
        rows.append(("total (process start to end)",
                     end["time"] - (first["launch"].get("process_started") or first["launch"]["time"])))
    return rows


def phases(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(phase, seconds) from one run's events: start-up, each step, saves, shutdown."""
    if any(e["event"] == "method_start" for e in events):
        return _method_phases(events)
    first = {}
    for e in events:
        first.setdefault(e["event"], e)
    t = lambda name: first[name]["time"] if name in first else None  # noqa: E731
    rows: list[tuple[str, float]] = []
    if t("launch") and first["launch"].get("process_started"):
        rows.append(("launcher (imports, OpenRLHF's parser and checks)", t("launch") - first["launch"]["process_started"]))
    if t("launch") and t("ray_ready"):
        rows.append(("Ray start", t("ray_ready") - t("launch")))
    prepared = [e["time"] for e in events if e["event"] == "model_prepared"]
    starts = [e["time"] for e in events if e["event"] == "model_init_start"]
    if t("ray_ready") and starts:
        rows.append(("Ray workers up (process start, import of OpenRLHF/vLLM/DeepSpeed)", min(starts) - t("ray_ready")))
    for e in events:
        if e["event"] == "vllm_ready":
            rows.append(("vLLM engine start (actor start to engine ready)", e["seconds"]))
    if prepared and starts:
        rows.append(("DeepSpeed actor + reference set-up (concurrent with vLLM)", max(prepared) - min(starts)))
    ready = [e["time"] for e in events if e["event"] in ("vllm_ready", "model_prepared", "actor_ready")]
    syncs = [e for e in events if e["event"] == "weight_sync"]
    saves = [e for e in events if e["event"] in ("checkpoint_saved", "hf_saved") and e.get("rank", 0) == 0]
    resumed_at = max((e.get("global_step") or 0 for e in events if e["event"] == "checkpoint_loaded"), default=0)
    if resumed_at and syncs:
        # PPOTrainer.fit syncs the resumed weights to vLLM before the first step.
        rows.append((f"weight sync of the resumed checkpoint (step {resumed_at})", syncs[0]["sync_seconds"]))
        boundaries = [s["time"] for s in syncs]
    else:
        boundaries = ([max(ready)] if ready else []) + [s["time"] for s in syncs]
    if t("launch") and boundaries:
        rows.append(("start-up total (launch to first step)", boundaries[0] - t("launch")))
    for k in range(1, len(boundaries)):
        lo, hi = boundaries[k - 1], boundaries[k]
        saved = sum(s["seconds"] for s in saves if lo <= s["time"] <= hi)
        rows.append((f"step {resumed_at + k} (rollout, experience, PPO update, weight sync + check)", hi - lo - saved))
    for s in saves:
        what = "checkpoint save" if s["event"] == "checkpoint_saved" else "HF export"
        rows.append((f"{what} ({s.get('tag') or os.path.basename(s.get('path', ''))})", s["seconds"]))
    if t("train_done") and t("ray_stopped"):
        rows.append(("Ray shutdown", t("ray_stopped") - t("train_done")))
    end = t("ray_stopped") or t("train_done")
    if t("launch") and end:
        start = first["launch"].get("process_started") or t("launch")
        rows.append(("total (process start to end)", end - start))
    return rows


def phase_table(events: list[dict[str, Any]]) -> str:
    lines = ["iapo-train-ray --cpu: wall time by phase"]
    lines += [f"  {name:<70} {seconds:8.1f} s" for name, seconds in phases(events)]
    return "\n".join(lines)

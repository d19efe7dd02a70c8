"""scripts/collect_results.py: finished runs into the paper's table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from iapo_openrlhf.eval.metrics import evaluate_matrices, write_reports

_spec = importlib.util.spec_from_file_location("collect_results", Path(__file__).parent.parent / "scripts" / "collect_results.py")
collect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect)


def _local_run(path: Path, evals: list[tuple[int, dict]]) -> None:
    path.mkdir()
    lines = [json.dumps({"step": 1, "reward": 0.5})] + [json.dumps({"step": s, "eval": e}) for s, e in evals]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_local_run_and_iapo_eval_output_in_one_table(tmp_path, capsys):
    correct = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    lengths = np.array([[10, 20, 30, 40], [5, 5, 5, 5]])
    late = evaluate_matrices(correct, lengths, [1, 4])  # P@1 0.5, L@1 7.5, P@4 1.0, L@4 15
    early = evaluate_matrices(~correct, lengths * 2, [1, 4])
    _local_run(tmp_path / "iapo_run", [(0, early), (20, late)])
    write_reports({"grpo": early}, [1, 4], tmp_path / "grpo_eval")

    assert collect.main([f"IAPO={tmp_path / 'iapo_run'}", str(tmp_path / "grpo_eval"), "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| Method | P@1 | L@1 | R@1 | P@4 | L@4 | R@4 |"
    assert table[2] == "| IAPO | 0.5000 | 7.50 | 6.67e-02 | 1.0000 | 15.00 | 6.67e-02 |"  # the last evaluation
    assert table[3].startswith("| grpo | 0.5000 | 15.00 |")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["ks"] == [1, 4] and set(saved["methods"]) == {"IAPO", "grpo"}


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert collect.main([str(tmp_path / "empty")]) == 2
    assert "neither metrics.json (iapo-eval) nor metrics.jsonl" in capsys.readouterr().err
    _local_run(tmp_path / "a", [(5, evaluate_matrices(np.ones((1, 2), bool), np.ones((1, 2)), [1, 2]))])
    assert collect.main([str(tmp_path / "a"), "--k", "8"]) == 2
    assert "--k: [8] not evaluated in every run, expected a subset of [1, 2]" in capsys.readouterr().err
    assert collect.main([f"X={tmp_path / 'a'}", f"X={tmp_path / 'a'}"]) == 2
    assert "appears twice" in capsys.readouterr().err


def test_rows_in_the_papers_method_order_and_local_runs_named_by_method(tmp_path, capsys):
    results = evaluate_matrices(np.array([[1, 0], [0, 1]], bool), np.array([[4, 6], [8, 2]]), [1, 2])
    for name, method in (("run_a", "significance"), ("run_b", "gfpo"), ("run_c", "dapo")):
        _local_run(tmp_path / name, [(10, results)])
        (tmp_path / name / "config.json").write_text(json.dumps({"method": method, "seed": 0}))
    write_reports({"S-GRPO": results, "iapo": results, "warm start": results}, [1, 2], tmp_path / "evals")
    runs = [str(tmp_path / "run_a"), str(tmp_path / "evals"), str(tmp_path / "run_b"), f"GTPO={tmp_path / 'run_c'}"]
    assert collect.main(runs) == 0
    rows = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines()[2:]]
    # no-method rows first; then the paper's DAPO, GFPO, GTPO, S-GRPO, IAPO; then the others.
    # A labelled local run keeps its label but is placed by its run's method (dapo here).
    assert rows == ["warm start", "GTPO", "GFPO (run_b, step 10)", "S-GRPO", "iapo",
                    "significance-aware length reward (run_a, step 10)"]
    assert collect.main([*runs, "--order", "given"]) == 0
    given = [line.split(" | ")[0][2:] for line in capsys.readouterr().out.splitlines()[2:]]
    assert given[0] == "significance-aware length reward (run_a, step 10)" and given[-1] == "GTPO"


def test_every_method_is_recognised_by_name_and_label():
    from iapo_openrlhf.core.methods import METHODS

    for name, spec in METHODS.items():
        assert collect.method_of(name) == name and collect.method_of(spec.label) == name
        assert collect.method_of(f"+ {spec.label}") == name
    assert collect.method_of("Qwen2.5-7B-Instruct") is None
    assert collect.method_of("anything", "gfpo") == "gfpo"


# -- a whole study (iapo-slurm study's table job) -----------------------------------------------------

def _study(tmp_path: Path, runs: dict[tuple[str, int], dict | str]) -> Path:
    """A study directory as iapo-slurm study leaves it: per run a result, or 'no model' / 'no eval'."""
    study = tmp_path / "study"
    manifest = {"config": "c.yaml", "methods": sorted({m for m, _ in runs}), "ks": [1, 2], "runs": []}
    for (method, seed), result in runs.items():
        run_dir = study / "runs" / f"{method}-seed{seed}"
        run_dir.mkdir(parents=True)
        if result != "no model":
            (run_dir / "final").mkdir()
            (run_dir / "final" / "config.json").write_text("{}")
        if isinstance(result, dict):
            write_reports({f"{method}-seed{seed}": result}, [1, 2], run_dir / "eval")
        manifest["runs"].append({"name": f"{method}-seed{seed}", "method": method, "seed": seed, "dir": str(run_dir),
                                 "train_job": "11", "train_log": f"logs/train-{method}-{seed}.log",
                                 "eval_log": f"logs/eval-{method}-{seed}.log"})
    (study / "study.json").write_text(json.dumps(manifest))
    return study


def test_study_table_mean_std_over_seeds_and_failed_runs_listed(tmp_path, capsys):
    lengths = np.array([[10, 30], [20, 20]])
    good = evaluate_matrices(np.array([[1, 1], [1, 0]], bool), lengths, [1, 2])  # P@1 1.0, P@2 1.0
    half = evaluate_matrices(np.array([[0, 1], [1, 0]], bool), lengths, [1, 2])  # P@1 0.5, P@2 1.0
    study = _study(tmp_path, {("iapo", 0): good, ("iapo", 1): half, ("grpo", 0): good, ("grpo", 1): "no model",
                              ("gtpo", 0): "no eval"})
    assert collect.main(["--study", str(study)]) == 0
    out = capsys.readouterr().out
    table = study / "table"
    saved = json.loads((table / "metrics.json").read_text())
    assert saved["ks"] == [1, 2] and list(saved["methods"]) == ["GTPO", "IAPO", "GRPO"]  # the paper's order
    iapo = saved["methods"]["IAPO"]
    assert (iapo["runs"], iapo["runs_ok"], iapo["failed"]) == (2, 2, [])
    assert iapo["P@1"] == 0.75 and iapo["P@1 std"] == 0.25 and iapo["P@2 std"] == 0.0  # numpy std, ddof 0
    grpo = saved["methods"]["GRPO"]
    assert grpo["runs_ok"] == 1 and grpo["P@1"] == 1.0 and grpo["P@1 std"] == 0.0
    assert grpo["failed"] == [{"seed": 1, "reason": f"training failed: no model in {study / 'runs' / 'grpo-seed1'} "
                                                    "(see logs/train-grpo-1.log)"}]
    gtpo = saved["methods"]["GTPO"]
    assert gtpo["runs_ok"] == 0 and "P@1" not in gtpo
    assert gtpo["failed"][0]["reason"].startswith("evaluation failed or did not run: no ")
    # every run is in the table, a failed one as failed, never dropped
    assert [r["status"] for r in saved["runs"]] == ["ok", "ok", "ok", "failed", "failed"]
    md = (table / "metrics.md").read_text()
    assert md == out.split("written: ")[0]
    assert "| GTPO | failed | failed | failed | failed | failed | failed | 0 of 1; failed: seed 0 |" in md
    assert "| IAPO | 0.7500 ± 0.2500 | 1.0000 ± 0.0000 | 15.00 ± 0.00 | 20.00 ± 0.00 |" in md and "| 2 of 2 |" in md
    assert "| GRPO | 1.0000 ± 0.0000 |" in md and "1 of 2; failed: seed 1 |" in md
    assert "| iapo-seed1 | iapo | 1 | ok | - | 0.5000 | 1.0000 |" in md
    assert "| grpo-seed1 | grpo | 1 | failed: training failed: no model in" in md
    runs_csv = (table / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 6 and runs_csv[4].startswith("grpo-seed1,grpo,1,failed,training failed")
    methods_csv = (table / "metrics.csv").read_text().splitlines()
    assert methods_csv[0].startswith("label,method,runs,runs_ok,") and len(methods_csv) == 4
    assert (table / "accuracy_vs_length.png").stat().st_size > 0


def test_study_errors_are_one_line(tmp_path, capsys):
    assert collect.main(["--study", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study.json, expected the directory of an iapo-slurm study" in err
    study = _study(tmp_path, {("iapo", 0): "no eval"})
    assert collect.main(["--study", str(study), str(tmp_path)]) == 2
    assert "expected no run directories beside it" in capsys.readouterr().err

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

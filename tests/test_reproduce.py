"""scripts/reproduce_synthetic.py --smoke: the whole study at toy size (warm start, every method,
iapo-eval, aggregation, table and plots) in one subprocess, as CI runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_synthetic.py"
METHODS = ("grpo", "dapo", "iapo", "iapo_beta0", "iapo_alpha0")  # the default study's
NEW_METHODS = ("gfpo", "gtpo", "grpo_s", "sgrpo", "ib", "significance")  # the paper's table and related papers
KEYS = [f"{m}@{k}" for k in (1, 4, 8) for m in ("P", "L", "R")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # Both sets of methods in one study (one warm start, one pool): CI time
    out = tmp_path_factory.mktemp("repro")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--methods",
                           ",".join(METHODS + NEW_METHODS)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_method_has_numbers(smoke):
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS + NEW_METHODS)
    for method, agg in results["methods"].items():
        for key in KEYS + ["accuracy", "mean_length", "time_rollout", "time_mi", "time_update", "time_step",
                           "redundant_tokens", "redundant_frac"]:
            mean, std = agg[key]
            assert _finite(mean) and _finite(std), (method, key, agg[key])
        assert 0.0 <= agg["P@8"][0] <= 1.0 and agg["L@8"][0] > 0
        assert agg["time_step"][0] > 0 and agg["time_rollout"][0] > 0
    for key in KEYS:
        assert _finite(results["initial"][key])


def test_equal_rollout_budget_and_shared_eval(smoke):
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(METHODS + NEW_METHODS)
    budget = results["meta"]["steps"] * 64
    problems = {r["eval"]["num_problems"] for r in runs}
    assert problems == {results["meta"]["eval_problems"]}  # the same held-out problems for every method
    for r in runs:
        assert r["budget_rollouts"] == budget and r["rollouts"] >= budget
        if r["method"] != "dapo":  # DAPO may take fewer updates (it resamples groups)
            assert r["rollouts"] == budget and r["steps"] == results["meta"]["steps"]
        assert (out / "runs" / f"{r['method']}_s0" / "eval" / "metrics.json").exists()  # written by iapo-eval
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["rollouts"] == r["rollouts"]
    # IAPO runs the MI estimator, GRPO does not: the step split must show it
    iapo = next(r for r in runs if r["method"] == "iapo")
    assert all("mi_mean" in t for t in iapo["train"])
    assert not any("mi_mean" in t for t in next(r for r in runs if r["method"] == "grpo")["train"])


def test_table_and_plots(smoke):
    out, stdout = smoke
    table = (out / "results.md").read_text()
    for method in METHODS:
        rows = [line for line in table.splitlines() if line.startswith(f"| {method} |")]
        assert len(rows) == 3, method  # metrics, redundancy and step-time rows
        assert "nan" not in rows[0].lower() and "n.a." not in rows[0]
    assert "| P@1 | L@1 | R@1 | P@4 | L@4 | R@4 | P@8 | L@8 | R@8 |" in table
    assert "IAPO L@8 <= 0.75 x GRPO's" in table
    for name in ("curves.png", "accuracy_vs_length.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "wrote" in stdout


def test_methods_cover_every_registered_method():
    import importlib.util

    from iapo_openrlhf.core.methods import METHODS as CORE

    spec = importlib.util.spec_from_file_location("reproduce_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    used = {o.split("=", 1)[1] for overrides in module.METHODS.values() for o in overrides if o.startswith("method=")}
    assert used == set(CORE)
    assert module.DEFAULT_METHODS == METHODS  # the default run is the study the README reports


def test_the_other_methods_of_the_table(smoke):
    """--methods takes any of them: the other methods of the paper's table and the related papers."""
    out, _ = smoke
    results = json.loads((out / "results.json").read_text())
    budget = results["meta"]["steps"] * 64
    runs = [r for r in results["runs"] if r["method"] in NEW_METHODS]
    assert sorted(r["method"] for r in runs) == sorted(NEW_METHODS)
    for r in runs:
        assert r["rollouts"] == budget and r["steps"] == results["meta"]["steps"]  # GFPO samples 8, trains on 4
        assert _finite(r["eval"]["L@8"]) and 0 <= r["eval"]["P@8"] <= 1
    significance = next(r for r in runs if r["method"] == "significance")
    assert all("mi_mean" in t for t in significance["train"])  # its significance score is the MI pass
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in NEW_METHODS)


def test_unknown_method_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--methods", "grpo,ppo"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "--methods: unknown ['ppo']" in proc.stderr


def test_a_bad_override_is_refused_before_the_warm_start(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--methods", "grpo,iapo",
                           "--set", "iapo.probe_after=[.?]"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "error: grpo: --set iapo.probe_after=[.?]: the value is not valid YAML, expected it quoted, "
        "e.g. --set \"iapo.probe_after='[.?]'\"")
    assert not (tmp_path / "initial").exists()

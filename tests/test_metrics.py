"""P@k / pass@k / L@k / R@k on hand-computed matrices, and the report files."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest

from iapo_openrlhf.eval import (
    evaluate_matrices,
    length_at_k,
    pass_at_k_first,
    pass_at_k_unbiased,
    ratio_at_k,
    to_markdown,
    write_reports,
)

# 3 problems x 4 samples.
CORRECT = [
    [0, 1, 0, 0],  # solved by sample 2 only (c = 1)
    [1, 1, 1, 1],  # always solved (c = 4)
    [0, 0, 0, 0],  # never solved (c = 0)
]
LENGTHS = [
    [10, 20, 30, 40],
    [5, 5, 5, 5],
    [100, 0, 50, 50],
]
# P@k (first k):  k=1: only row 1 -> 1/3;  k=2: rows 0, 1 -> 2/3;  k=4: 2/3.
# pass@k, n = 4:  row 0: 1 - C(3,k)/C(4,k) = 1 - 3/4, 1 - 3/6, 1 - 0/1 = 1/4, 1/2, 1 for k = 1, 2, 4;
#                 row 1: 1;  row 2: 0  ->  pass@1 = 5/12, pass@2 = 1/2, pass@4 = 2/3.
# L@k:  k=1: (10+5+100)/3 = 115/3;  k=2: (30+10+100)/6 = 70/3;  k=4: (100+20+200)/12 = 80/3.
# R@k = P@k / L@k:  k=1: 1/115;  k=2: (2/3)/(70/3) = 1/35;  k=4: (2/3)/(80/3) = 1/40.
EXPECTED = {
    1: {"P": 1 / 3, "pass": 5 / 12, "L": 115 / 3, "R": 1 / 115},
    2: {"P": 2 / 3, "pass": 1 / 2, "L": 70 / 3, "R": 1 / 35},
    4: {"P": 2 / 3, "pass": 2 / 3, "L": 80 / 3, "R": 1 / 40},
}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hand_computed(k):
    exp = EXPECTED[k]
    assert pass_at_k_first(CORRECT, k) == pytest.approx(exp["P"])
    assert pass_at_k_unbiased(CORRECT, k) == pytest.approx(exp["pass"])
    assert length_at_k(LENGTHS, k) == pytest.approx(exp["L"])
    assert ratio_at_k(CORRECT, LENGTHS, k) == pytest.approx(exp["R"])


def test_evaluate_matrices():
    result = evaluate_matrices(np.array(CORRECT, dtype=bool), np.array(LENGTHS), [1, 2, 4])
    assert result["num_problems"] == 3 and result["num_samples"] == 4
    for k, exp in EXPECTED.items():
        for metric, value in exp.items():
            assert result[f"{metric}@{k}"] == pytest.approx(value)
    json.dumps(result)  # plain Python numbers only


def test_pass_at_k_unbiased_matches_enumeration():
    rng = np.random.default_rng(0)
    correct = rng.random((7, 6)) < 0.3
    correct[0] = False
    correct[1] = True
    for k in range(1, 7):
        brute = np.mean([
            np.mean([row[list(subset)].any() for subset in itertools.combinations(range(6), k)]) for row in correct
        ])
        assert pass_at_k_unbiased(correct, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_unbiased_large_n_is_finite():
    correct = np.zeros((2, 2000), dtype=bool)
    correct[0, :3] = True  # C(2000, 1000) overflows floats; the product form does not need it
    value = pass_at_k_unbiased(correct, 1000)
    assert 0 < value < 0.5 and np.isfinite(value)


def test_zero_lengths_give_nan_ratio():
    assert np.isnan(ratio_at_k([[True]], [[0]], 1))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pass_at_k_first(CORRECT, 0), r"^k: got 0, expected an integer in \[1, 4\]"),
        (lambda: pass_at_k_unbiased(CORRECT, 5), r"^k: got 5, expected an integer in \[1, 4\]"),
        (lambda: length_at_k(LENGTHS, 1.5), r"^k: got 1.5"),
        (lambda: evaluate_matrices(CORRECT, LENGTHS, [1, 8]), r"^k: got 8"),
        (lambda: evaluate_matrices(CORRECT, [[1, 2]], [1]), r"^lengths: got shape \(1, 2\), expected \(3, 4\)"),
        (lambda: evaluate_matrices(CORRECT, LENGTHS, []), r"^ks: got an empty list"),
        (lambda: pass_at_k_first([], 1), r"^correct: got shape \(0,\), expected a non-empty"),
        (lambda: pass_at_k_first(np.zeros((3, 0), bool), 1), r"^correct: got shape \(3, 0\)"),
        (lambda: pass_at_k_first([1, 0, 1], 1), r"^correct: got shape \(3,\)"),
        (lambda: pass_at_k_first([[0, 2]], 1), r"^correct: got dtype int\d+ with values other than 0/1"),
        (lambda: length_at_k([[1, -3]], 1), r"^lengths: got -3, expected finite token counts >= 0"),
        (lambda: length_at_k([["a", "b"]], 1), r"^lengths: got dtype <U1, expected numeric"),
        (lambda: to_markdown({"grpo": {"P@1": 0.5}}, [1]), r"^results_by_method\['grpo'\]: got no 'L@1'"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def _two_methods() -> dict:
    other_correct = [[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1]]
    return {
        "GRPO": evaluate_matrices(CORRECT, LENGTHS, [1, 4]),
        "IAPO": evaluate_matrices(other_correct, np.array(LENGTHS) // 2, [1, 4]) | {"inference_seconds": 1.25},
    }


def test_to_markdown_layout():
    lines = to_markdown(_two_methods(), [1, 4]).splitlines()
    assert lines[0] == "| Method | P@1 | L@1 | R@1 | P@4 | L@4 | R@4 |"
    assert lines[1].startswith("|---|")
    # GRPO row from EXPECTED: 1/3, 115/3, 1/115, 2/3, 80/3, 1/40.
    assert lines[2] == "| GRPO | 0.3333 | 38.33 | 8.70e-03 | 0.6667 | 26.67 | 2.50e-02 |"
    assert lines[3].startswith("| IAPO | 0.6667 |")
    assert len(lines) == 4


def test_write_reports(tmp_path):
    methods = _two_methods()
    paths = write_reports(methods, [1, 4], tmp_path / "reports")
    assert set(paths) == {"json", "csv", "md", "png"}
    assert all(p.parent == tmp_path / "reports" and p.stat().st_size > 0 for p in paths.values())

    data = json.loads(paths["json"].read_text())
    assert data["ks"] == [1, 4] and data["methods"]["GRPO"]["P@1"] == pytest.approx(1 / 3)

    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["GRPO", "IAPO"]
    assert float(rows[0]["R@4"]) == pytest.approx(1 / 40)
    assert rows[0]["inference_seconds"] == "" and float(rows[1]["inference_seconds"]) == 1.25

    assert paths["md"].read_text().startswith("| Method | P@1 | L@1 | R@1 | P@4 | L@4 | R@4 |\n")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

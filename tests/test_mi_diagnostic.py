"""scripts/mi_diagnostic.py: the AUC against hand-made cases, the segment parser against the
generator's exact labels, and a small end-to-end run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mi_diagnostic.py"


@pytest.fixture(scope="module")
def diag():
    spec = importlib.util.spec_from_file_location("mi_diagnostic_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pair_count_auc(scores, positive):
    """Reference: the fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_hand_made_cases(diag):
    assert diag.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert diag.auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert diag.auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # positives {0.4, 0.8}, negatives {0.1, 0.4, 0.6}: pairs 0.4>0.1, 0.4=0.4 (1/2), 0.4<0.6,
    # 0.8 beats all three: (1 + 0.5 + 0 + 3) / 6 = 0.75
    assert diag.auc([0.1, 0.4, 0.4, 0.6, 0.8], [0, 0, 1, 0, 1]) == pytest.approx(0.75)
    # the score's scale does not matter, only its order
    assert diag.auc([-3, 10, 2], [0, 1, 1]) == diag.auc([0, 1e6, 5], [0, 1, 1]) == 1.0
    assert np.isnan(diag.auc([1.0, 2.0], [1, 1]))
    with pytest.raises(ValueError):
        diag.auc([1.0, 2.0], [1, 0, 1])


def test_auc_matches_pair_counting_with_ties(diag):
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        positive = rng.random(n) < 0.4
        positive[0], positive[1] = True, False
        assert diag.auc(scores, positive) == pytest.approx(pair_count_auc(scores, positive), abs=1e-12)


def test_average_ranks(diag):
    assert diag.average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_parser_reproduces_generator_labels(diag):
    from iapo_openrlhf.tasks.synthetic import SyntheticTask, build_tokenizer

    task, tok, rng = SyntheticTask(5), build_tokenizer(), random.Random(0)
    for problem in task.problems("test", 150):
        trace = task.sample_trace(problem, rng)
        kinds, firsts = diag.segment_labels([tok.decode([i]) for i in trace.token_ids], problem)
        expected = [s.kind for s in trace.segments for _ in tok(s.text, add_special_tokens=False).input_ids]
        assert kinds == expected
        assert sum(firsts) == len(trace.segments)


def test_parser_marks_what_the_grammar_does_not_make_as_other(diag):
    from iapo_openrlhf.tasks.synthetic import SyntheticTask, build_tokenizer

    task, tok = SyntheticTask(0), build_tokenizer()
    problem = task.problems("test", 1)[0]
    step = problem.steps[0].text
    text = step + step + " banana ." + " check 1 + 1 = 2 ." + f"</think><answer>{problem.answer}</answer>"
    ids = tok(text, add_special_tokens=False).input_ids
    kinds, _ = diag.segment_labels([tok.decode([i]) for i in ids], problem)
    n_step = len(tok(step, add_special_tokens=False).input_ids)
    assert set(kinds[:n_step]) == {"step"}
    assert set(kinds[n_step : 2 * n_step]) == {"other"}  # the same step again is not a new step
    assert "check" in kinds and kinds[-1] == "answer"
    truncated = tok(step + " first", add_special_tokens=False).input_ids
    assert diag.segment_labels([tok.decode([i]) for i in truncated], problem)[0][-1] == "other"


def test_small_run_writes_json_and_png(diag, tmp_path, capsys):
    from iapo_openrlhf.tasks.warmstart import warm_start

    model = warm_start(tmp_path / "model", seed=0, steps=5, progress=False)
    argv = ["--model", str(model), "--out", str(tmp_path / "out"), "--num-problems", "12",
            "--max-new-tokens", "24", "--resamples", "20"]
    assert diag.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"segment-start AUC = (\d\.\d{3}|nan) \[(\d\.\d{3}|nan), (\d\.\d{3}|nan)\]", printed[-1])
    report = json.loads((tmp_path / "out" / "mi_diagnostic.json").read_text())
    study = report["sampled_completions"]["segment_start"]
    prereg = json.loads((tmp_path / "out" / "preregistration.json").read_text())
    assert prereg["chosen"] == study["preregistration"]["chosen"]  # on disk before the test split was scored
    grid = prereg["validation_grid"]
    assert {g["mode"] for g in grid} == {"every", "boundary"} and len(grid) == 2 * (1 + 9 * 6)
    assert study["test"]["cost"]["boundary"]["probes"] < study["test"]["cost"]["every"]["probes"]
    assert report["parser_agreement_on_generator_traces"] == 1.0
    for name in ("postfix", "next_token", "postfix_stride4"):
        r = report["generator_traces"][name]
        assert 0.0 <= r["auc_mi"] <= 1.0 and 0.0 <= r["auc_abs_mi"] <= 1.0
        assert r["necessary"]["tokens"] > 0 and r["redundant"]["tokens"] > 0
    assert (tmp_path / "out" / "mi_histogram.png").stat().st_size > 1000


def test_segment_start_scores_hand_made(diag):
    """The shaping at segment-first tokens: with h falling by 1 over each step and flat over each
    filler, horizon 1 already ranks every step start above every filler start (AUC 1) when the
    drop is spread over the segment (boundary probing), and the horizon carries a drop that sits
    on a step's last token back to its first token."""
    import torch

    # tokens: step (4) filler (2) step (4) eos; h before each token and after the last
    kinds = ["step"] * 4 + ["filler"] * 2 + ["step"] * 4
    firsts = [True, False, False, False, True, False, True, False, False, False]
    spread = [2.0, 1.75, 1.5, 1.25, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    late = [2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    points = diag.segment_start_points([(kinds, firsts)])
    assert points[0][0].tolist() == [0, 4, 6] and points[0][1].tolist() == [True, False, True]
    for h_row, horizon, expected in ((spread, 1, 1.0), (late, 1, 0.5), (late, 4, 1.0)):
        h, act = diag._padded([np.array(h_row)])
        scores = diag.shaping_at_segment_starts(h, act, points, horizon=horizon, decay=1.0, norm="zscore")
        assert diag.segment_start_auc(scores, points)["auc"] == expected, (h_row, horizon)
    assert torch.is_tensor(h)


def test_segment_start_auc_by_necessary_kind(diag):
    """Steps ranked above the filler, the answer below it: 2 of 3 pairs right overall, all with
    steps only, none with the answer only."""
    kinds = ["step"] * 2 + ["filler"] * 2 + ["step"] * 2 + ["answer"] * 2
    firsts = [True, False, True, False, True, False, True, False]
    points = diag.segment_start_points([(kinds, firsts)])
    scores = [np.array([1.0, 0.0, 2.0, -1.0])]  # at the first tokens of step, filler, step, answer
    assert diag.segment_start_auc(scores, points)["auc"] == 2 / 3
    by_kind = diag.auc_by_necessary_kind(scores, points, [(kinds, firsts)])
    assert by_kind == {"steps_vs_redundant": 1.0, "answer_vs_redundant": 0.0}


def test_the_estimators_hold_is_the_labelled_answer_segments(diag):
    """--mi-hold-after '</think>' (the estimator's iapo.mi_hold_after) on generator traces holds h
    from exactly the labelled answer segment's first token on: every later MI is 0, every earlier
    one unchanged. (Past "</think>" the probe's entropy jumps, issue 18.)"""
    import torch

    from iapo_openrlhf.core.mi import token_mi
    from iapo_openrlhf.core.probes import token_texts
    from iapo_openrlhf.tasks.synthetic import SyntheticTask, build_tokenizer

    task, tok, rng = SyntheticTask(3, variant="preamble"), build_tokenizer(), random.Random(0)
    rows, answer_starts = [], []
    for problem in task.problems("test", 40):
        trace = task.sample_trace(problem, rng)
        kinds, _ = diag.segment_labels([tok.decode([i]) for i in trace.token_ids], problem)
        rows.append(([1, 2], list(trace.token_ids) + [tok.eos_token_id]))
        answer_starts.append(kinds.index("answer"))
    gen = torch.Generator().manual_seed(0)
    h, act = diag._padded([torch.rand(len(r) + 1, generator=gen).numpy() for _, r in rows])
    held, before = diag.held_after(h, act, rows, token_texts(tok), "</think>")
    mi, mi_held = token_mi(h, act), token_mi(held, act)
    for i, c in enumerate(answer_starts):
        assert torch.equal(mi_held[i, :c], mi[i, :c]) and not mi_held[i, c:].any()
        assert mi[i, c:].abs().sum() > 0  # there was MI to remove
        # --mi-held-tokens exclude: the MI term covers the reasoning, up to the answer segment
        assert before[i, :c].all() and not before[i, c:].any()
    assert torch.equal(held[:, 0], h[:, 0])


def test_excluded_held_tokens_score_zero_and_leave_the_statistics(diag):
    """--mi-held-tokens exclude: the answer segment's first token scores exactly 0 (no shaping),
    and the other scores are the z-score over the reasoning tokens alone, not over the row."""
    import torch

    from iapo_openrlhf.core.mi import token_mi

    kinds = ["step"] * 3 + ["filler"] * 2 + ["step"] * 2 + ["answer"] * 3
    firsts = [True, False, False, True, False, True, False, True, False, False]
    points = diag.segment_start_points([(kinds, firsts)])
    h, act = diag._padded([np.array([2.0, 1.8, 1.5, 1.5, 1.5, 1.4, 0.5, 0.1, 0.1, 0.1, 0.1])])
    before = torch.zeros_like(act)
    before[0, :7] = True
    mi = token_mi(h, act)[0, :7].double()
    z = ((mi - mi.mean()) / (mi.std(unbiased=False) + 1e-6)).float()
    got = diag.shaping_at_segment_starts(h, act, points, horizon=1, decay=1.0, norm="zscore", mi_mask=before)[0]
    assert got[-1] == 0 and torch.allclose(torch.as_tensor(got[:3]), z[[0, 3, 5]], atol=1e-6)
    plain = diag.shaping_at_segment_starts(h, act, points, horizon=1, decay=1.0, norm="zscore")[0]
    assert plain[-1] != 0 and not np.allclose(plain[:3], got[:3])


def test_shaping_by_length_scores_a_studys_mi_settings(tmp_path, capsys, monkeypatch):
    """scripts/shaping_by_length.py with the study's MI settings (horizon, hold, exclude): runs on a
    tiny warm start, records the settings, gives no shaping at "</think>" with exclude (some with
    zero); exclude without a hold text is a one-line usage error."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import shaping_by_length

    from iapo_openrlhf.tasks.warmstart import warm_start

    model = warm_start(tmp_path / "model", seed=0, steps=30, progress=False)
    out = tmp_path / "exclude.json"
    argv = ["--model", str(model), "--variant", "preamble", "--num-problems", "16", "--max-new-tokens", "48",
            "--horizon", "4", "--out", str(out)]
    assert shaping_by_length.main(argv + ["--mi-hold-after", "</think>", "--mi-held-tokens", "exclude"]) == 0
    report = json.loads(out.read_text())
    assert (report["horizon"], report["mi_hold_after"], report["mi_held_tokens"]) == (4, "</think>", "exclude")
    assert report["zscore"]["answer_start_shaping_mean"] == 0.0  # some samples do stop
    assert shaping_by_length.main(argv + ["--mi-hold-after", "</think>"]) == 0  # zero: shaped there
    assert json.loads(out.read_text())["zscore"]["answer_start_shaping_mean"] != 0.0
    with pytest.raises(SystemExit) as err:
        shaping_by_length.main(argv + ["--mi-held-tokens", "exclude"])
    assert err.value.code == 2 and "--mi-held-tokens exclude: needs --mi-hold-after" in capsys.readouterr().err

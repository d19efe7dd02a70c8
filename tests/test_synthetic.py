"""The synthetic task and the warm start: what the CPU-scale RL runs rely on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iapo_openrlhf.tasks.synthetic import (
    NUMBER_WORDS,
    TAGS,
    SyntheticTask,
    build_tokenizer,
    check_answer,
    split_of,
    vocabulary,
)
from iapo_openrlhf.tasks.warmstart import evaluate, tiny_qwen2_config, warm_start


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def traces():
    task = SyntheticTask(3)
    rng = random.Random(0)
    return [(p, task.sample_trace(p, rng)) for p in task.problems("train", 300)]


def test_generator_is_deterministic_in_the_seed():
    def draw(seed: int) -> list[tuple[str, str]]:
        task = SyntheticTask(seed)
        rng = random.Random(seed)
        return [(p.prompt, task.sample_trace(p, rng).completion) for p in task.problems("train", 50)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    task = SyntheticTask(1)
    assert task.problems("test", 20) == task.problems("test", 40)[:20]


def test_answers_follow_the_question():
    task = SyntheticTask(0)
    for problem in task.problems("train", 500) + task.problems("test", 100):
        assert 2 <= len(problem.steps) <= 4
        value = int(problem.sentences[0].split()[2])
        for step, sentence in zip(problem.steps, problem.sentences[1:-1]):
            amount, verb, order, _ = sentence.split()
            assert (step.order, step.verb, step.right) == (order, verb, NUMBER_WORDS.index(amount))
            assert step.left == value
            value = value + step.right if step.op == "+" else value - step.right
            assert step.result == value and 0 <= value <= task.max_value
        assert problem.answer == value
        assert len({s.verb for s in problem.steps}) == len(problem.steps)
        assert problem.steps[-1].order == "last" and len({s.order for s in problem.steps}) == len(problem.steps)
        assert problem.prompt == problem.question + "<think>"


def test_train_and_test_are_disjoint():
    task = SyntheticTask(0)
    train = {p.canonical for p in task.problems("train", 3000)}
    test = [p.canonical for p in task.problems("test", 300)]
    assert len(set(test)) == len(test) == 300
    assert not train & set(test)
    # The split is a function of the problem alone: another seed's test problems are never in
    # this seed's training set.
    other = {p.canonical for p in SyntheticTask(7).problems("test", 300)}
    assert not train & other
    assert all(split_of(c, 0.1) == "test" for c in other)


def test_redundancy_labels_align_with_tokens(tokenizer, traces):
    n_redundant = []
    for problem, trace in traces:
        ids = tokenizer(trace.completion, add_special_tokens=False).input_ids
        assert list(trace.token_ids) == ids
        assert len(trace.redundant_mask) == len(ids)
        necessary = [i for i, r in zip(ids, trace.redundant_mask) if not r]
        redundant = [i for i, r in zip(ids, trace.redundant_mask) if r]
        # Dropping the redundant tokens leaves exactly the necessary steps and the answer ...
        expected = "".join(s.text for s in problem.steps) + f"</think><answer>{problem.answer}</answer>"
        assert tokenizer.decode(necessary) == expected
        # ... and the redundant tokens are exactly the inserted segments, in order.
        inserted = [s for s in trace.segments if s.redundant]
        assert tokenizer.decode(redundant) == "".join(s.text for s in inserted)
        assert all(s.kind in ("restate", "check", "filler") for s in inserted)
        n_redundant.append(len(inserted))
    assert min(n_redundant) == 0 and max(n_redundant) == 6  # concise and verbose traces mixed
    assert sum(n == 0 for n in n_redundant) > 0.15 * len(n_redundant)


def test_no_redundancy_gives_concise_traces():
    task = SyntheticTask(0, redundancy=0.0)
    rng = random.Random(0)
    for problem in task.problems("train", 50):
        trace = task.sample_trace(problem, rng)
        assert not any(trace.redundant_mask)
        assert [s.kind for s in trace.segments] == ["step"] * len(problem.steps) + ["answer"]


def test_tokenizer_round_trip(tokenizer, traces):
    for problem, trace in traces:
        for text in (problem.prompt, trace.completion):
            assert tokenizer.decode(tokenizer(text).input_ids) == text  # nothing unknown or dropped
        whole = tokenizer(problem.prompt + trace.completion).input_ids
        assert whole == tokenizer(problem.prompt).input_ids + list(trace.token_ids)
        assert tokenizer.unk_token_id not in whole
    # Every word of the closed vocabulary is one token, numbers are digits.
    for word in {w for p, t in traces for w in (p.prompt + t.completion).split()}:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(" " + word).input_ids)
        if not word.isdigit() and not any(tag in word for tag in TAGS):
            assert len(pieces) == 1, (word, pieces)
    # The estimator's postfix continues any prefix with the same two tokens the traces end with.
    postfix = tokenizer("</think><answer>", add_special_tokens=False).input_ids
    assert postfix == tokenizer.convert_tokens_to_ids(["</think>", "<answer>"])
    for _, trace in traces:
        k = trace.token_ids.index(postfix[0])
        assert list(trace.token_ids[k : k + 2]) == postfix


def test_tokenizer_specials_and_answer_decoding(tokenizer):
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "<eos>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == len(vocabulary()[0])
    ids = tokenizer(" first bought five , 7 + 5 = 12 .</think><answer>12</answer>").input_ids
    text = tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True)
    assert text.endswith("</think><answer>12</answer>")  # tags survive skip_special_tokens


def test_tokenizer_saves_and_loads_offline_next_to_a_qwen2_config(tokenizer, traces, tmp_path):
    # A Qwen2 config makes AutoTokenizer rebuild a Qwen2Tokenizer from vocab + merges: the
    # tokenizer must come back identical through that path, which OpenRLHF and vLLM take.
    tiny_qwen2_config(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    for problem, trace in traces[:50]:
        text = problem.prompt + trace.completion
        assert loaded(text).input_ids == tokenizer(text).input_ids
        assert loaded.decode(loaded(text).input_ids) == text


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" first bought five , 7 + 5 = 12 .</think><answer>12</answer>", True),
        ("</think><answer> 12 </answer>", True),
        ("<answer>3</answer> changed my mind <answer>12</answer>", True),
        ("</think><answer>13</answer>", False),
        ("<answer>12</answer><answer>13</answer>", False),
        ("</think><answer>twelve</answer>", False),
        ("</think><answer>12", False),
        ("7 + 5 = 12 .", False),
        ("", False),
    ],
)
def test_check_answer(completion, expected):
    assert check_answer(completion, 12) is expected


def test_check_answer_takes_a_problem():
    problem = SyntheticTask(0).problems("test", 1)[0]
    assert check_answer(f"</think><answer>{problem.answer}</answer>", problem)
    assert not check_answer(f"</think><answer>{problem.answer + 1}</answer>", problem)


def test_export_jsonl(tmp_path):
    task = SyntheticTask(0)
    path = task.export_jsonl(tmp_path / "train.jsonl", "train", 20)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 20
    tokenizer = build_tokenizer()
    for row, problem in zip(rows, task.problems("train", 20)):
        assert set(row) == {"prompt", "answer", "completion", "redundant_mask"}
        assert (row["prompt"], row["answer"]) == (problem.prompt, problem.answer)
        assert len(row["redundant_mask"]) == len(tokenizer(row["completion"]).input_ids)
        assert check_answer(row["completion"], problem)


def test_tiny_config_fits_vllm(tokenizer):
    config = tiny_qwen2_config(tokenizer)
    assert config.head_dim >= 32 and config.hidden_size == config.num_attention_heads * config.head_dim
    assert config.vocab_size == len(tokenizer)


def test_warm_start_writes_a_loadable_model(tmp_path):
    out = warm_start(tmp_path / "policy", steps=3, batch_size=4, n_train_problems=64, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    problems = SyntheticTask(0).problems("test", 2)
    torch.manual_seed(0)
    result = evaluate(model, tokenizer, problems, samples=2, max_new_tokens=8)
    assert 0.0 <= result["accuracy"] <= 1.0 and 0 < result["mean_length"] <= 8
    # Same seed, same weights.
    again = AutoModelForCausalLM.from_pretrained(
        warm_start(tmp_path / "again", steps=3, batch_size=4, n_train_problems=64, progress=False)
    )
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_neutral_variant_writes_no_number_in_redundant_segments(tokenizer):
    """Issue 18's task option: the same problems and necessary steps as the classic task; the
    redundant segments are fillers and restatements of the question's last sentence only, which
    write no digit and no order word (nothing the next step reads)."""
    from iapo_openrlhf.tasks.synthetic import _FILLERS, ORDER_WORDS

    classic, neutral = SyntheticTask(4), SyntheticTask(4, variant="neutral")
    assert classic.problems("test", 50) == neutral.problems("test", 50)
    rng = random.Random(0)
    kinds = set()
    for problem in neutral.problems("train", 300):
        trace = neutral.sample_trace(problem, rng)
        steps = [s.text for s in trace.segments if s.kind == "step"]
        assert steps == [s.text for s in problem.steps]
        for seg in trace.segments:
            if seg.redundant:
                kinds.add(seg.kind)
                assert seg.text in {" " + problem.sentences[-1], *(" " + f for f in _FILLERS)}
                assert not any(c.isdigit() for c in seg.text)
                assert not set(seg.text.split()) & set(ORDER_WORDS)
        ids = tokenizer(trace.completion, add_special_tokens=False).input_ids
        assert tuple(ids) == trace.token_ids and len(trace.redundant_mask) == len(ids)
    assert kinds == {"restate", "filler"}
    with pytest.raises(ValueError, match="variant"):
        SyntheticTask(0, variant="noisy")


def test_preamble_variant_moves_the_neutral_segments_before_the_first_step():
    """The same draws as the neutral variant (same segments, same steps), every redundant one
    before the first step; and the parser of sampled completions labels them the same way."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from mi_diagnostic import segment_labels

    neutral, preamble = SyntheticTask(4, variant="neutral"), SyntheticTask(4, variant="preamble")
    rng_n, rng_p = random.Random(3), random.Random(3)
    tok = build_tokenizer()
    moved = 0
    for problem in preamble.problems("train", 300):
        a, b = neutral.sample_trace(problem, rng_n), preamble.sample_trace(problem, rng_p)
        assert [s for s in b.segments if not s.redundant] == [s for s in a.segments if not s.redundant]
        assert sorted(s.text for s in b.segments if s.redundant) == sorted(s.text for s in a.segments if s.redundant)
        first_step = next(i for i, s in enumerate(b.segments) if s.kind == "step")
        assert all(s.redundant for s in b.segments[:first_step]) and not any(s.redundant for s in b.segments[first_step:])
        moved += a.segments != b.segments
        kinds, _ = segment_labels([tok.decode([t]) for t in b.token_ids], problem)
        assert [int(k in ("restate", "filler")) for k in kinds] == list(b.redundant_mask)
    assert moved > 100


def test_classic_traces_are_unchanged_by_the_variant_option():
    rng_a, rng_b = random.Random(7), random.Random(7)
    a, b = SyntheticTask(2), SyntheticTask(2, variant="classic")
    for problem in a.problems("train", 100):
        assert a.sample_trace(problem, rng_a) == b.sample_trace(problem, rng_b)


def test_early_exit_warm_start(tmp_path):
    """early_exit_weight > 0 adds the answer after cut traces to the loss (other weights than
    plain SFT after 3 steps); its rows come from their own generator, so weight 0 stays bit for
    bit today's warm start."""
    from iapo_openrlhf.tasks.warmstart import _early_exit_rows

    tok = build_tokenizer()
    task = SyntheticTask(0, variant="neutral")
    problems = task.problems("train", 16)
    prompt_ids = tok([p.prompt for p in problems], add_special_tokens=False).input_ids
    rows = next(_early_exit_rows(task, problems, prompt_ids, tok, random.Random(0), 8, "</think><answer>"))
    for ids, first in rows:
        text = tok.decode(ids)
        assert tok.decode(ids[:first]).endswith("</think><answer>")
        assert text.endswith("</answer>") and check_answer(text[text.rindex("<answer>"):], int(tok.decode(ids[first:-1])))
    kwargs = dict(steps=3, batch_size=4, n_train_problems=64, progress=False, task=task)
    plain = AutoModelForCausalLM.from_pretrained(warm_start(tmp_path / "plain", **kwargs))
    zero = AutoModelForCausalLM.from_pretrained(warm_start(tmp_path / "zero", early_exit_weight=0.0, **kwargs))
    probe = AutoModelForCausalLM.from_pretrained(warm_start(tmp_path / "probe", early_exit_weight=1.0, **kwargs))
    for a, b in zip(plain.state_dict().values(), zero.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), probe.state_dict().values()))
    with pytest.raises(ValueError, match="early_exit_weight"):
        warm_start(tmp_path / "bad", early_exit_weight=-1.0, **kwargs)


def test_early_exit_stage_script_equals_the_one_call_warm_start(tmp_path):
    """scripts/early_exit_stage.py on a saved plain warm start gives the model of
    warm_start(early_exit_steps=...) bit for bit (how the README's issue-18 warm start was made)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "early_exit_stage.py"
    spec = importlib.util.spec_from_file_location("early_exit_stage", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = dict(seed=0, batch_size=4, n_train_problems=64, warmup_steps=1)
    task = SyntheticTask(0, variant="neutral")
    one_call = warm_start(tmp_path / "one", steps=3, task=task, progress=False, early_exit_weight=0.5,
                          early_exit_steps=2, early_exit_lr=1e-3, **common)
    plain = warm_start(tmp_path / "plain", steps=3, task=SyntheticTask(0, variant="neutral"), progress=False, **common)
    staged = script.early_exit_stage(plain, tmp_path / "staged", variant="neutral", weight=0.5, steps=2, lr=1e-3,
                                     stage1_steps=3, **common)
    a = AutoModelForCausalLM.from_pretrained(one_call).state_dict()
    b = AutoModelForCausalLM.from_pretrained(staged).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_variant_and_early_exit_config_reach_the_local_warm_start(tmp_path, monkeypatch):
    """data.variant and model.warmstart_early_exit of the config reach the local backend's task and
    warm start (bad values: one-line ConfigError)."""
    import re

    from iapo_openrlhf.config import ConfigError, load_config
    from iapo_openrlhf.local.trainer import LocalTrainer
    from iapo_openrlhf.tasks import warmstart

    class Stop(Exception):
        pass

    seen = {}

    def spy(out_dir, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(warmstart, "warm_start", spy)
    cfg = load_config("configs/local_tiny.yaml", [f"output.dir={tmp_path}", "data.variant=neutral",
                                                  "model.warmstart_early_exit=0.3"])
    with pytest.raises(Stop):
        LocalTrainer(cfg, progress=False).train()
    assert seen["task"].variant == "neutral" and seen["early_exit_weight"] == 0.3
    assert seen["early_exit_postfix"] == cfg.iapo.postfix
    for override, message in (("data.variant=noisy", "data.variant: got 'noisy', expected one of"),
                              ("model.warmstart_early_exit=-1", "model.warmstart_early_exit: got -1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("configs/local_tiny.yaml", [override])

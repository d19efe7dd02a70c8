"""The reward-function file, loaded and called the way OpenRLHF does it.

OpenRLHF (`openrlhf.utils.agent.SingleTurnAgentExecutor`) loads `--reward.remote_url x.py` with
`spec_from_file_location` and calls `reward_func([query], [prompt], [label])` in a thread; the
sample's reward/scores/extra_logs then go through `SamplesGenerator._process_response_into_experience`.
These tests use those OpenRLHF functions themselves, not copies.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from iapo_openrlhf.data import r1_prompt
from iapo_openrlhf.openrlhf import cpu_stubs
from iapo_openrlhf.rewards import R1_SYSTEM_PROMPT

cpu_stubs.install()

from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator  # noqa: E402
from openrlhf.utils.agent import SingleTurnAgentExecutor  # noqa: E402

from iapo_openrlhf.openrlhf import reward_func as reward_module  # noqa: E402

PATH = reward_module.PATH
QUESTION = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, and sells the rest for $2 each. How much?"
PLAIN_PROMPT = r1_prompt(QUESTION, R1_SYSTEM_PROMPT)  # ends with "<think>"
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(template: str = QWEN_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (exact decode round trip) with Qwen-style specials and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([R1_SYSTEM_PROMPT, QUESTION], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tokenizer.chat_template = template
    return tokenizer


def chat_prompt(tokenizer) -> str:
    messages = [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture
def executor(monkeypatch):
    monkeypatch.delenv(reward_module.SCHEME_ENV, raising=False)
    return SingleTurnAgentExecutor(remote_rm_url=[PATH])


def fetch(executor, query: str, prompt: str, label):
    results = asyncio.run(executor._fetch_rewards_via_func([query], [prompt], [label]))
    assert isinstance(results, list) and len(results) == 1
    return results[0]


def numbers(info: dict) -> tuple[float, float, float, float]:
    """(reward, score, correct, format) after checking each is a float32 tensor of shape (1,)."""
    assert set(info) == {"rewards", "scores", "extra_logs"} and set(info["extra_logs"]) == {"correct", "format"}
    tensors = [info["rewards"], info["scores"], info["extra_logs"]["correct"], info["extra_logs"]["format"]]
    for t in tensors:
        assert isinstance(t, torch.Tensor) and t.shape == (1,) and t.dtype == torch.float32
    return tuple(t.item() for t in tensors)


def test_openrlhf_loads_the_file_standalone(executor):
    assert executor.reward_func is not None
    assert executor.reward_func.__module__ == "reward_func"  # OpenRLHF's module name, not the package's
    assert executor.reward_func is not reward_module.reward_func


# (response after a prompt ending in "<think>", label, reward under "paper", correct, format)
PLAIN_CASES = [
    (" 16-3-4=9 eggs, 9*2=18 dollars. </think> <answer>18</answer><|im_end|>", "18", 1.5, 1, 1),
    (" 9*2=18 </think>\n<answer>She makes \\boxed{18} dollars.</answer><|im_end|><|endoftext|>", "18", 1.5, 1, 1),
    (" 9*2=18 </think> <answer>$18.00</answer>\n<|im_end|>", "18", 1.5, 1, 1),
    (" 9*2=18\n#### 18<|im_end|>", "18", 0.5, 1, 0),  # GSM8K style, no tags: correct, bad format
    (" so the answer is \\boxed{18}<|im_end|>", "18", 0.5, 1, 0),
    (" 16-3-4=9 </think> <answer>17</answer><|im_end|>", "18", -0.5, 0, 1),  # wrong, well formed
    (" <think> 9*2=18 </think> <answer>18</answer><|im_end|>", "18", 0.5, 1, 0),  # re-opens <think>
    (" big </think> <answer>1,080</answer><|im_end|>", "1080", 1.5, 1, 1),
    (" ^^%% }{ \\boxed{ <answer <|im_end|>", "18", -1.5, 0, 0),  # garbage
    ("", "18", -1.5, 0, 0),
    ("<|im_end|>", "18", -1.5, 0, 0),
    (" 9*2=18 </think> <answer>18</answer><|im_end|>", "", -0.5, 0, 1),  # empty label is never matched
]


@pytest.mark.parametrize("response, label, reward, correct, fmt", PLAIN_CASES)
def test_rewards_and_scores_through_openrlhf(executor, response, label, reward, correct, fmt):
    got = numbers(fetch(executor, PLAIN_PROMPT + response, PLAIN_PROMPT, label))
    assert got == (reward, float(correct), float(correct), float(fmt))


def test_think_tag_opened_by_the_model_when_the_prompt_does_not_end_with_it(executor):
    prompt = chat_prompt(chat_tokenizer())
    assert prompt.endswith("<|im_start|>assistant\n")
    good = "<think> 9*2=18 </think> <answer>18</answer><|im_end|>"
    assert numbers(fetch(executor, prompt + good, prompt, "18")) == (1.5, 1.0, 1.0, 1.0)
    unopened = " 9*2=18 </think> <answer>18</answer><|im_end|>"
    assert numbers(fetch(executor, prompt + unopened, prompt, "18")) == (0.5, 1.0, 1.0, 0.0)


def test_math_answers(executor):
    response = " ... </think> <answer>\\boxed{\\dfrac{3}{4}}</answer><|im_end|>"
    assert numbers(fetch(executor, PLAIN_PROMPT + response, PLAIN_PROMPT, "\\frac{3}{4}")) == (1.5, 1.0, 1.0, 1.0)
    response = " ... </think> <answer>(3, -\\frac{1}{2})</answer><|im_end|>"
    gold = "\\left( 3, -\\frac{1}{2} \\right)"
    assert numbers(fetch(executor, PLAIN_PROMPT + response, PLAIN_PROMPT, gold))[1] == 1.0


def test_query_not_starting_with_the_prompt(executor):
    response = " 9*2=18 </think> <answer>18</answer><|im_end|>"
    # OpenRLHF left-truncates a long prompt, and a tokenizer may add a BOS: the prompt's tail anchors.
    for query in (PLAIN_PROMPT[-100:] + response, "<s>" + PLAIN_PROMPT + response):
        assert numbers(fetch(executor, query, PLAIN_PROMPT, "18")) == (1.5, 1.0, 1.0, 1.0)
    # No trace of the prompt: the whole query is scored (answer found, R1 format not credited).
    assert numbers(fetch(executor, "Q: something else\n#### 18", PLAIN_PROMPT, "18")) == (0.5, 1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "scheme, rewards",
    [
        ("paper", [1.5, 0.5, -0.5, -1.5]),
        ("correctness", [1.0, 1.0, 0.0, 0.0]),
        ("correctness_pm1", [1.0, 1.0, -1.0, -1.0]),
    ],
)
def test_scheme_from_environment(monkeypatch, scheme, rewards):
    monkeypatch.setenv(reward_module.SCHEME_ENV, scheme)
    executor = SingleTurnAgentExecutor(remote_rm_url=[PATH])  # the scheme is read when OpenRLHF loads the file
    responses = [
        " 9*2=18 </think> <answer>18</answer><|im_end|>",  # correct, formatted
        " 9*2=18 #### 18<|im_end|>",  # correct, not formatted
        " 9*2=18 </think> <answer>19</answer><|im_end|>",  # wrong, formatted
        " 9*2=18 #### 19<|im_end|>",  # wrong, not formatted
    ]
    got = [numbers(fetch(executor, PLAIN_PROMPT + r, PLAIN_PROMPT, "18")) for r in responses]
    assert [g[0] for g in got] == rewards
    assert [g[1] for g in got] == [1.0, 1.0, 0.0, 0.0]  # scores are correctness under every scheme


def test_unknown_scheme_fails_when_loaded(monkeypatch):
    monkeypatch.setenv(reward_module.SCHEME_ENV, "papper")
    with pytest.raises(ValueError, match="IAPO_REWARD_SCHEME: got 'papper'"):
        SingleTurnAgentExecutor(remote_rm_url=[PATH])


def test_never_raises(executor):
    func = executor.reward_func
    worst = {"rewards": [-1.5], "scores": [0.0]}
    for args in [([None], [PLAIN_PROMPT], ["18"]), ([b"bytes"], [None], [None]), (["x"], None, None), (["x"], [], [])]:
        out = func(*args)
        assert out["rewards"].tolist() == worst["rewards"] and out["scores"].tolist() == worst["scores"]
    batch = func([PLAIN_PROMPT + " #### 18", PLAIN_PROMPT + " #### 3"], [PLAIN_PROMPT] * 2, ["18", 3])
    assert batch["rewards"].tolist() == [0.5, 0.5] and batch["extra_logs"]["correct"].tolist() == [1.0, 1.0]
    assert func([], [], [])["rewards"].shape == (0,)


class FakeEngine:
    """Stands in for the vLLM engine: returns fixed completion token ids."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = SimpleNamespace(token_ids=self.token_ids, text="", finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


@pytest.mark.parametrize("template_think", [False, True])
def test_end_to_end_through_execute_and_experience(executor, template_think):
    """Tokenised rollout -> SingleTurnAgentExecutor.execute -> Experience, with OpenRLHF's own code."""
    # R1-distilled templates end the generation prompt with "<think>\n"
    template = QWEN_TEMPLATE.replace("assistant\n", "assistant\n<think>\n") if template_think else QWEN_TEMPLATE
    tokenizer = chat_tokenizer(template)
    prompt = chat_prompt(tokenizer)
    assert prompt.endswith("<think>\n") == template_think
    opener = "" if template_think else "<think>"
    responses = {  # text -> (reward, score)
        f"{opener} 9*2=18 </think> <answer>18</answer>": (1.5, 1.0),
        f"{opener} 9*2=18 </think> <answer>20</answer>": (-0.5, 0.0),
        " 9*2 is 18.\n#### 18": (0.5, 1.0),
    }
    experiences = []
    for text, (reward, score) in responses.items():
        ids = tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        params = SimpleNamespace(max_tokens=64, logprobs=None)
        output = asyncio.run(executor.execute(prompt, "18", params, 1024, tokenizer, FakeEngine(ids)))
        assert output["reward"].tolist() == [reward] and output["scores"].tolist() == [score]
        experience = SamplesGenerator._process_response_into_experience(None, output, max_len=1024)
        assert experience.rewards.shape == (1,) and experience.rewards.item() == reward
        assert experience.scores.shape == (1,) and experience.scores[0].item() == score  # dynamic filtering reads this
        assert experience.info["reward"].tolist() == [reward] and experience.info["score"].tolist() == [score]
        assert experience.info["correct"].tolist() == [score] and experience.info["format"].shape == (1,)
        experiences.append(experience)
    # experience_maker.compute_advantages_and_returns concatenates the per-sample rewards
    assert torch.cat([e.rewards for e in experiences]).tolist() == [r for r, _ in responses.values()]


def test_path_command():
    out = subprocess.run(
        [sys.executable, "-m", "iapo_openrlhf.openrlhf.reward_func", "--path"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == PATH and PATH.endswith("reward_func.py")

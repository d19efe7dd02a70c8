"""Micro-batches made by OpenRLHF 0.11's own code, for the plugin's tests.

OpenRLHF's rollout path minus vLLM: its agent executor (`SingleTurnAgentExecutor`, or
`MultiTurnAgentExecutor` with a scripted environment) tokenises the prompt, asks the engine for
tokens and records the action ranges; `SamplesGenerator._process_response_into_experience` turns
each response into one unpadded `Experience` (`action_mask = mask[1:]`); the experience maker's
`Experience.concat_experiences` right-pads a micro-batch. The one stand-in is the engine,
`ScriptedEngine`, which returns given token ids (vLLM cannot sample inside a test process).

Import after `cpu_stubs.install()` (OpenRLHF imports flash_attn at module level).
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor, SingleTurnAgentExecutor

from iapo_openrlhf.tasks.synthetic import build_tokenizer

TOKENIZER = build_tokenizer()  # a real Qwen2Tokenizer (285 ids); the test models' vocabulary covers it
VOCAB = 300
PROMPTS = [
    "tom has 3 apples , he buys 4 more . how many ?",
    "ann had 9 pens .",
    "a box holds 12 eggs , 5 break , then 2 more are added , how many eggs are in the box now ?",
    "ben walks 6 km .",
    "sue reads 10 pages a day for 3 days .",
]


class ScriptedEngine:
    """Stands in for OpenRLHF's vLLM engine: each generate() returns the next scripted token ids."""

    def __init__(self, completions: list[list[int]]):
        self.completions = list(completions)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        ids = self.completions.pop(0)
        out = SimpleNamespace(token_ids=ids, text="", finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


class TwoTurnEnvironment(AgentInstanceBase):
    """A tool-like environment: answers the first action with an observation, ends after the second."""

    def __init__(self, *args, **kwargs):
        self.turn = 0

    async def step(self, state_dict, **kwargs):
        self.turn += 1
        done = self.turn >= 2
        return {"rewards": torch.tensor(0.0), "scores": torch.tensor(0.0), "done": done,
                "environment_feedback": "" if done else " the tool says 7 ."}


def completion(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB - 20) for _ in range(length)]


def experiences(response_lens: list[int], *, multi_turn: bool = False, seed: int = 0,
                max_len: int = 1024) -> list[Experience]:
    """One Experience per rollout, each through OpenRLHF's executor and samples generator.
    multi_turn: two actions per rollout (response_lens[i] tokens each) around an observation."""
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    out = []
    for i, n in enumerate(response_lens):
        prompt = PROMPTS[i % len(PROMPTS)]
        if multi_turn:
            executor = MultiTurnAgentExecutor(TwoTurnEnvironment)
            engine = ScriptedEngine([completion(n, seed + i), completion(max(1, n // 2), seed + 100 + i)])
        else:
            executor = SingleTurnAgentExecutor()
            engine = ScriptedEngine([completion(n, seed + i)])
        response = asyncio.run(executor.execute(prompt, "7", params, max_len, TOKENIZER, engine))
        out.append(SamplesGenerator._process_response_into_experience(None, response, max_len=max_len))
    return out


def micro_batch(response_lens: list[int], **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequences, attention_mask, action_mask) of one micro-batch as OpenRLHF's experience maker
    sends it to the actor: `Experience.concat_experiences` of the rollouts (right-padded)."""
    batch = Experience.concat_experiences(experiences(response_lens, **kwargs), TOKENIZER.pad_token_id)
    return batch.sequences, batch.attention_mask, batch.action_mask

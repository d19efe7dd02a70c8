"""A synthetic multi-step arithmetic task that needs no download.

Why it exists: the CPU-scale runs (README job, CI, reproduction study) need a task on which a tiny
model, trained from scratch in minutes, is accurate but not perfect and verbose in a controlled
way. Word problems have exactly checkable integer answers, and their chains of thought mix the
necessary steps with redundant segments whose positions are known token by token, so that what RL
removes can be measured.

Format (the IAPO estimator's default postfix "</think><answer>" is a natural continuation of any
prefix of the trace: the tags are single tokens and nothing else sits between trace and tag):
    prompt     = "Tom has 7 apples , five bought first , three sold last . How many apples does Tom have ?<think>"
    completion = " first bought five , 7 + 5 = 12 . check 7 + 5 = 12 . last sold three , 12 - 3 = 9 ."
                 "</think><answer>9</answer>"
`tokenizer.decode(tokenizer(text).input_ids) == text` for every prompt and completion. No spaces
around the tags: Qwen2's pre-tokenizer would make them tokens of their own.

Token labels (`Trace.redundant_mask`, aligned with `tokenizer(completion).input_ids`, no EOS):
1 for tokens of redundant segments (restatements of the question, re-checks of the step just
done, filler), 0 for necessary steps and for the closing "</think><answer>N</answer>" tokens.
`Trace.segments` keeps the finer classes (step / answer / restate / check / filler).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

Split = Literal["train", "test"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)

_NAMES = ("Ann", "Ben", "Eve", "Mia", "Sam", "Tom")
_OBJECTS = ("apples", "pens", "coins", "books", "cards", "stamps")
# Amounts are words (one token each) and the trace computes in digits: copying an amount out of
# the question is then a one-token lookup, where copying digits would need the model to skip the
# separate space token that Qwen2's pre-tokenizer puts before every number. The starting value
# stays in digits: the only digits of the prompt, it is copied without being confused with them.
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
# Each operation is one clause "five bought first": amount, verb, then an adverb naming the
# operation's place. The trace writes them backwards (" first bought five"), so each copy out of
# the question is one attention hop (to the same word in the question, reading the word before
# it) instead of a search for the k-th clause; verbs are distinct within a problem so the hop is
# unambiguous. This is what makes the task learnable by a 2-layer model in minutes (measured).
# The last operation is always "last", so whether the trace goes on is read off its own last step.
ORDER_WORDS = ("first", "next", "later", "last")
_ADD_VERBS = ("bought", "found", "won", "received")
_SUB_VERBS = ("sold", "lost", "used", "dropped")
_FILLERS = ("let me think .", "wait .", "ok .", "hmm .", "let me see .", "so far so good .")
_FIXED_WORDS = "has How many does have ? . , + - = check"

# Kinds of trace segments; the redundant ones are the ones RL should learn to drop.
NECESSARY_KINDS = ("step", "answer")
REDUNDANT_KINDS = ("restate", "check", "filler")
# Task variants (`SyntheticTask(variant=...)`): which redundant segments a trace may contain.
#   classic  restatements of any sentence of the question (the opening one carries the starting
#            number), re-checks of the step just done, fillers: the task of the issue-7 study,
#            on which redundancy costs accuracy (a restated number sits in front of the next step
#            and the tiny model copies it).
#   neutral  segments that write no number and no order word: fillers and restatements of the
#            question's last sentence ("How many apples does Tom have ?"), anywhere. Redundancy
#            then changes nothing the next step reads (issue 18: a task on which redundancy does
#            not cost accuracy, so that outcome reward alone does not remove it).
#   preamble the neutral segments, all before the first step (hesitation before starting). On
#            the neutral warm start's own samples, redundancy between steps cost accuracy and
#            redundancy before the first step did not (README, issue 18): the tiny model copies
#            each step's operand worse across a gap, and nothing is copied across a preamble.
VARIANTS = ("classic", "neutral", "preamble")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class Step:
    """One necessary step: the clause it reads (" first bought five ,") and its equation
    (" 7 + 5 = 12 .")."""

    left: int
    op: Literal["+", "-"]
    right: int
    result: int
    order: str
    verb: str

    @property
    def equation(self) -> str:
        return f" {self.left} {self.op} {self.right} = {self.result} ."

    @property
    def text(self) -> str:
        return f" {self.order} {self.verb} {NUMBER_WORDS[self.right]} ,{self.equation}"

    @property
    def clause(self) -> str:
        return f"{NUMBER_WORDS[self.right]} {self.verb} {self.order}"


@dataclass(frozen=True)
class Problem:
    question: str
    prompt: str
    answer: int
    steps: tuple[Step, ...]
    sentences: tuple[str, ...]  # the question's clauses as sentences, which restatements repeat

    @property
    def canonical(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """The arithmetic alone (start, ops): names, objects and verbs are surface variation, so
        two problems with the same canonical form count as the same problem for the split."""
        return self.steps[0].left, tuple((s.op, s.right) for s in self.steps)


@dataclass(frozen=True)
class Segment:
    text: str  # starts with a space or a tag, so segments tokenize independently
    kind: str  # one of NECESSARY_KINDS + REDUNDANT_KINDS

    @property
    def redundant(self) -> bool:
        return self.kind in REDUNDANT_KINDS


@dataclass(frozen=True)
class Trace:
    completion: str
    segments: tuple[Segment, ...]
    token_ids: tuple[int, ...]  # == build_tokenizer()(completion).input_ids, no EOS
    redundant_mask: tuple[int, ...]  # per token of token_ids, see module docstring


def split_of(canonical: tuple, test_fraction: float) -> Split:
    """Train/test membership from a stable hash of the canonical problem, so the splits are
    disjoint by construction whatever the seed or the number of problems drawn."""
    digest = hashlib.sha256(repr(canonical).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def check_answer(completion: str, problem: Problem | int) -> bool:
    """Exact integer match of the content of the last <answer> ... </answer>."""
    expected = problem if isinstance(problem, int) else problem.answer
    found = _ANSWER_RE.findall(completion)
    if not found:
        return False
    content = found[-1].strip()
    return re.fullmatch(r"-?\d+", content) is not None and int(content) == expected


class SyntheticTask:
    """Seeded generator of problems and chains of thought.

    `redundancy` is the probability that a trace is verbose at all; a verbose trace gets a number
    of redundant segments drawn uniformly from 0 .. `max_redundant`, so SFT data mixes concise and
    verbose traces of widely varying length. `variant` says which redundant segments exist
    (`VARIANTS`); the problems, the splits and the necessary steps do not depend on it. Every value stays in [0, `max_value`]: with 30 the
    digit arithmetic is learnt within the warm-start budget, which sets the defaults.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        redundancy: float = 0.8,
        max_redundant: int = 6,
        min_ops: int = 2,
        max_ops: int = 4,
        start_range: tuple[int, int] = (2, 20),
        amount_range: tuple[int, int] = (1, 9),
        max_value: int = 30,
        test_fraction: float = 0.1,
        variant: str = "classic",
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not 0.0 <= redundancy <= 1.0:
            raise ValueError(f"redundancy must be in [0, 1], got {redundancy}")
        if not 1 <= min_ops <= max_ops <= len(ORDER_WORDS):
            raise ValueError(f"need 1 <= min_ops <= max_ops <= {len(ORDER_WORDS)}, got {min_ops}, {max_ops}")
        top = len(NUMBER_WORDS) - 1
        if not (0 <= start_range[0] <= start_range[1] <= max_value and 1 <= amount_range[0] <= amount_range[1] <= top):
            raise ValueError(f"need start in [0, max_value={max_value}] and amounts in [1, {top}] (written as words)")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.seed = seed
        self.redundancy = redundancy
        self.max_redundant = max_redundant
        self.min_ops, self.max_ops = min_ops, max_ops
        self.start_range, self.amount_range, self.max_value = start_range, amount_range, max_value
        self.test_fraction = test_fraction
        self.variant = variant

    # -- problems ----------------------------------------------------------------------------

    def problems(self, split: Split, n: int) -> list[Problem]:
        """`n` problems of `split`, distinct by canonical form. Deterministic in (seed, split),
        and a prefix of the list a larger `n` would give."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.seed}:{split}:problems")
        out: list[Problem] = []
        seen: set[tuple] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 10_000:
                raise ValueError(f"cannot draw {n} distinct {split} problems from this task's range")
            problem = self._random_problem(rng)
            if problem.canonical in seen or split_of(problem.canonical, self.test_fraction) != split:
                continue
            seen.add(problem.canonical)
            out.append(problem)
        return out

    def _random_problem(self, rng: random.Random) -> Problem:
        name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
        value = rng.randint(*self.start_range)
        clauses = [f"{name} has {value} {obj}"]
        steps: list[Step] = []
        used_verbs: set[str] = set()
        n_ops = rng.randint(self.min_ops, self.max_ops)
        for order in (*ORDER_WORDS[: n_ops - 1], ORDER_WORDS[-1]):
            lo = self.amount_range[0]
            op = rng.choice([op for op, ok in (("+", value + lo <= self.max_value), ("-", value >= lo)) if ok])
            hi = min(self.amount_range[1], self.max_value - value if op == "+" else value)
            amount = rng.randint(self.amount_range[0], hi)
            result = value + amount if op == "+" else value - amount
            verb = rng.choice([v for v in (_ADD_VERBS if op == "+" else _SUB_VERBS) if v not in used_verbs])
            used_verbs.add(verb)
            steps.append(Step(value, op, amount, result, order, verb))
            clauses.append(steps[-1].clause)
            value = result
        ask = f"How many {obj} does {name} have ?"
        question = f"{' , '.join(clauses)} . {ask}"
        sentences = (*(c + " ." for c in clauses), ask)
        return Problem(question, question + THINK, value, tuple(steps), sentences)

    # -- traces ------------------------------------------------------------------------------

    def sample_trace(self, problem: Problem, rng: random.Random) -> Trace:
        """A chain of thought: the necessary steps in order, with redundant segments inserted at
        random slots (before, between or after the steps).

        Redundant segments only repeat what is already established (the opening sentence, the
        question, the sentence and the equation of the step just done), so they lengthen the trace
        without changing which operation comes next: removing them never costs accuracy.
        """
        n_redundant = rng.randint(0, self.max_redundant) if rng.random() < self.redundancy else 0
        n_slots = len(problem.steps) + 1
        inserted: list[list[Segment]] = [[] for _ in range(n_slots)]
        for _ in range(n_redundant):
            slot = rng.randrange(n_slots)
            if self.variant == "preamble":
                slot = 0  # drawn anyway: the neutral variant's random stream stays as it was
            if self.variant in ("neutral", "preamble"):
                kind = rng.choice(("restate", "filler"))
                text = " " + (problem.sentences[-1] if kind == "restate" else rng.choice(_FILLERS))
                inserted[slot].append(Segment(text, kind))
                continue
            kinds = REDUNDANT_KINDS if slot > 0 else ("restate", "filler")  # a check needs a step before it
            kind = rng.choice(kinds)
            if kind == "restate":
                text = " " + problem.sentences[rng.choice((0, slot, -1))]
            elif kind == "check":
                text = " check" + problem.steps[slot - 1].equation
            else:
                text = " " + rng.choice(_FILLERS)
            inserted[slot].append(Segment(text, kind))
        segments: list[Segment] = list(inserted[0])
        for step, extra in zip(problem.steps, inserted[1:]):
            segments.append(Segment(step.text, "step"))
            segments.extend(extra)
        segments.append(Segment(f"{END_THINK}{ANSWER}{problem.answer}{END_ANSWER}", "answer"))
        encoded = _labelling_tokenizer()([s.text for s in segments], add_special_tokens=False).input_ids
        ids = tuple(i for seg_ids in encoded for i in seg_ids)
        mask = tuple(int(s.redundant) for s, seg_ids in zip(segments, encoded) for _ in seg_ids)
        return Trace("".join(s.text for s in segments), tuple(segments), ids, mask)

    def export_jsonl(self, path: str | Path, split: Split, n: int) -> Path:
        """One trace per problem as {"prompt", "answer", "completion", "redundant_mask"} rows."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{self.seed}:{split}:traces")
        with path.open("w", encoding="utf-8") as f:
            for problem in self.problems(split, n):
                trace = self.sample_trace(problem, rng)
                row = {
                    "prompt": problem.prompt,
                    "answer": problem.answer,
                    "completion": trace.completion,
                    "redundant_mask": list(trace.redundant_mask),
                }
                f.write(json.dumps(row) + "\n")
        return path


# -- tokenizer ---------------------------------------------------------------------------------


def vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges in which every word of the task (with its leading
    space, and the names also without, as they open the prompt) is one token.

    Fixed ids: 0..2 = pad, eos, unk, 3..6 = the tags, then the byte-level characters the task
    uses, then one token per merge. Numbers stay digits, as in Qwen2.5.
    """
    words: list[str] = []
    for text in (*_OBJECTS, *ORDER_WORDS, *_ADD_VERBS, *_SUB_VERBS, *NUMBER_WORDS, *_FILLERS, _FIXED_WORDS):
        words.extend(" " + w for w in text.split() if " " + w not in words)
    words.extend(n for name in _NAMES for n in (" " + name, name))
    to_bytes = ByteLevel.alphabet()
    encoded = ["".join(c if c in to_bytes else "Ġ" for c in w) for w in words]  # " " -> "Ġ"
    alphabet = sorted({c for w in encoded for c in w} | set("0123456789"))
    vocab = [PAD, EOS, UNK, *TAGS, *alphabet]
    merges: list[tuple[str, str]] = []
    # Words with their leading space first: their merges then take priority inside any word.
    for w in sorted(encoded, key=lambda w: not w.startswith("Ġ")):
        for end in range(2, len(w) + 1):
            if w[:end] not in vocab:
                merges.append((w[: end - 1], w[end - 1]))
                vocab.append(w[:end])
    return vocab, merges


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2 tokenizer (byte-level BPE, Qwen2's pre-tokenizer) over a tiny vocabulary.

    Why Qwen2's own class rather than a word-level tokenizer: `AutoTokenizer.from_pretrained` on a
    directory whose config.json is a Qwen2 model always rebuilds a `Qwen2Tokenizer` from the
    saved vocab and merges with Qwen2's pre-tokenizer (transformers 5), whatever tokenizer.json
    says; OpenRLHF and vLLM load that way. A tokenizer that is a Qwen2Tokenizer from the start
    loads back identically. The tags are added tokens but not special ones, so
    `decode(..., skip_special_tokens=True)` keeps them for the answer parser.
    """
    tokens, merges = vocabulary()
    tokenizer = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=UNK,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tokenizer


@functools.cache
def _labelling_tokenizer() -> PreTrainedTokenizerFast:
    """Private instance for token labels, so callers may reconfigure theirs. Segments start with a
    space or a tag, which Qwen2's pre-tokenizer always splits at, so their ids concatenate to the
    completion's ids."""
    return build_tokenizer()

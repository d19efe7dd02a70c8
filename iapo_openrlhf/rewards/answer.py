"""Final-answer extraction and checking for GSM8K- and MATH-style problems.

A reward function sees whatever the policy emits, so everything here is total: garbage in gives
`None` / `False` out, never an exception, and the work per call is bounded. Symbolic equivalence is
delegated to math-verify; this module only decides *which* string a completion commits to and
guards math-verify against inputs that would make sympy run for minutes.

Time bounds. math-verify's own timeouts use `signal.alarm`, which raises off the main thread (and
only fires between Python bytecodes). On the main thread we keep them; elsewhere (Ray threaded
actors, thread pools) we pass `None` and rely on caps instead: only the last `MAX_TEXT_CHARS` of a
completion are read, answers longer than `MAX_ANSWER_CHARS` or matching the costly patterns in
`_too_costly` (exponent towers, huge integers under `^`/`!`/binomials, deep nesting) never reach
sympy. Such answers are still compared as normalised strings, so an identical gold still matches.
The same caps apply on every thread, so a verdict never depends on the calling thread.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

MAX_TEXT_CHARS = 2000  # the final answer sits at the end; reading more only costs time
MAX_ANSWER_CHARS = 300  # longest MATH gold answers (matrices, intervals) are ~150 chars
MAX_NESTING = 10  # sympy's LaTeX parser slows down steeply with bracket depth (~5 s at depth 20)
MATH_VERIFY_TIMEOUT_S = 5  # per parse / comparison, main thread only
# Plain-number answers: an integer gold (18, "1,450,000", "18.00") compares exactly, so 1450001 is
# never "close enough" to 1,450,000. A non-integer gold ("0.25", "3.75") accepts a prediction within
# 1e-6 of it: math-verify, which judges every answer that is not a plain number, compares floats
# rounded to 6 decimal places, and the fast path must not disagree with it. 1e-6 is far below the
# precision GSM8K / MATH decimal golds are written with (at most 4 places), so the tolerance only
# forgives float noise ("0.30000000000000004" for 0.3), never a wrong last digit.
NUMERIC_ABS_TOL = Fraction(1, 10**6)

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

# A span may not contain another "<answer>": a tag merely mentioned in the reasoning must not
# swallow the real answer that follows it.
_ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)(?:</answer>|\Z)", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
# Only the phrase, not the rest of the line: in "Final Answer: The final answer is $18$." the
# matches must not overlap, or the first one swallows the second.
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:|=)\s*:?[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_WRAPPERS = re.compile(r"^(?:\*\*|\$|\\\(|\\\[|\s)+|(?:\*\*|\$|\\\)|\\\]|\s|[.;:])+$")

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
# "18 eggs": plain unit words after a number. Three letters or more, so "5 x" / "5 pi" stay
# expressions for math-verify.
_UNIT_WORDS = re.compile(r"(?:\s+[A-Za-z]{3,})+\s*$")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_NUMBER_NOISE = re.compile(r"\\\$|\$|\\%|%|\\!|\\,|\\;|\\ |\s|\\text\{\s*\}")

_BIG_INT = re.compile(r"\d{6,}")
_HEAVY_OP = re.compile(r"\^|!|\\[dt]?binom|\\choose|\*\*")
_COSTLY_EXPONENT = re.compile(r"\^|!|\*|\\cdot|\\times|\d{5,}")
_EXPONENT_GROUP = re.compile(r"\^\s*\{")
_FACTORIAL_OF_GROUP = re.compile(r"[)}]\s*!")
_BINOMIAL = re.compile(r"\\[dt]?binom|\\choose")


def _braced(text: str, open_brace: int) -> str | None:
    """Content of the brace group opening at `text[open_brace]`, or None if it never closes."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last *closed* `\\boxed{...}`: a truncated last box falls back to an earlier one."""
    for match in reversed(list(_BOXED.finditer(text))):
        content = _braced(text, match.end() - 1)
        if content is not None:
            return content
    return None


def _clean(answer: str) -> str | None:
    """Strip math delimiters, markdown bold and a sentence-final period; None if nothing is left."""
    answer = _WRAPPERS.sub("", answer)
    return answer or None


def _committed_answer(text: str) -> str | None:
    """Priority inside a span: last `\\boxed{}`, last `#### x`, last "the answer is x"."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    hashes = _HASHES.findall(text)
    if hashes:
        return _clean(hashes[-1])
    phrases = list(_ANSWER_IS.finditer(text))
    if phrases:
        phrase = text[phrases[-1].end() :].split("\n", 1)[0]
        end = _SENTENCE_END.search(phrase)  # "is 18. So ..." -> "18"; "is 0.5" keeps its point
        return _clean(phrase[: end.start()] if end else phrase)
    return None


# Detokenised end-of-turn / padding markers at the end of a query: <|im_end|>, <|endoftext|>,
# <|eot_id|>, </s>, <｜end▁of▁sentence｜>. Stripped so "#### 18<|im_end|>" reads as "18".
_END_MARKER = re.compile(r"(?:<[|｜][^<>]{0,40}[|｜]>|</s>)\Z")


def strip_end_markers(text: str) -> str:
    """`text` without trailing whitespace and end-of-turn markers."""
    while True:
        text = text.rstrip()
        match = _END_MARKER.search(text[-48:])
        if match is None:
            return text
        text = text[: len(text) - len(match.group())]


def extract_answer(text: str | None) -> str | None:
    """The final answer string a completion commits to, or None.

    Priorities, most explicit commitment first:
      1. the content of the last non-blank `<answer>...</answer>` (an unclosed last `<answer>` runs to
         the end, because rollouts often stop *on* `</answer>`); inside it a `\\boxed{}`, `####` or "the answer
         is" is unwrapped, otherwise the whole content is the answer;
      2. the last closed `\\boxed{...}` (MATH convention);
      3. the last `#### x` (GSM8K convention);
      4. the last "The answer is x" / "Answer: x", cut at the end of the sentence.
    Nothing else (e.g. "the last number in the text") counts: a reward for an uncommitted number
    would teach the policy to ramble. Only the last `MAX_TEXT_CHARS` characters are read.
    """
    if not isinstance(text, str):
        return None
    text = strip_end_markers(text[-MAX_TEXT_CHARS:])
    tagged = [span for span in _ANSWER_TAG.findall(text) if span.strip()]
    if tagged:
        return _committed_answer(tagged[-1]) or _clean(tagged[-1])
    return _committed_answer(text)


def _gold_answer(gold: str | int | float | None) -> str | None:
    """The answer in a label: plain ("18"), a GSM8K solution ("... #### 18") or a MATH solution (boxed)."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return str(gold)
    if not isinstance(gold, str):
        return None
    return extract_answer(gold) or _clean(gold[-MAX_TEXT_CHARS:])


def _as_number(answer: str) -> Fraction | None:
    """Exact value of a plain number ("1,000", "$18.00", "25\\%", "-5", "−5", "18 eggs"), else None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return None
    answer = _NUMBER_NOISE.sub("", _UNIT_WORDS.sub("", answer)).replace("\u2212", "-")
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    if not _NUMBER.fullmatch(answer):
        return None
    return Fraction(answer)


def _too_costly(answer: str) -> bool:
    """Heuristic: would sympy build or compare an astronomically large object from this answer?

    Measured: `9^{9^{9^{9}}}`, `10^{10^{10}}`, `1000000!`, `\\binom{10^7}{5 \\cdot 10^6}` each run
    for tens of seconds to forever inside math-verify, and off the main thread nothing stops them.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = max_depth = 0
    for char in answer:
        if char in "({[":
            depth += 1
            max_depth = max(max_depth, depth)
        elif char in ")}]":
            depth -= 1
    if max_depth > MAX_NESTING:
        return True
    if _BIG_INT.search(answer) and _HEAVY_OP.search(answer):
        return True
    if _FACTORIAL_OF_GROUP.search(answer) or (_BINOMIAL.search(answer) and "^" in answer):
        return True
    for match in _EXPONENT_GROUP.finditer(answer):  # a computed exponent: tower, product, factorial
        exponent = _braced(answer, match.end() - 1)
        if exponent is None or _COSTLY_EXPONENT.search(exponent):
            return True
    return False


def _math_verify_equal(gold: str, pred: str) -> bool:
    """Symbolic comparison through math-verify, with signal timeouts only where signals work."""
    on_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if on_main else None
    # Boxing anchors the LaTeX extractor on the whole answer: unboxed, "1, 2" parses as just 2.
    gold_parsed = parse(f"\\boxed{{{gold}}}", _EXTRACTION_CONFIG, parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", _EXTRACTION_CONFIG, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return verify(gold_parsed, pred_parsed, timeout_seconds=timeout)


def is_correct(completion: str | None, gold: str | int | float | None) -> bool:
    """Whether the answer `completion` commits to equals the gold label.

    Order: identical strings (modulo whitespace); then, if both sides are plain numbers, an exact
    rational comparison (fast, and right for "1,000", "$18.00", "25\\%" which math-verify misreads or
    parses slowly): equality for an integer gold, within `NUMERIC_ABS_TOL` (1e-6) for a non-integer
    one; otherwise math-verify, unless `_too_costly`.
    Never raises: any failure is a wrong answer.
    """
    try:
        pred = extract_answer(completion)
        target = _gold_answer(gold)
        if pred is None or target is None:
            return False
        if re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", target):
            return True
        pred_num, target_num = _as_number(pred), _as_number(target)
        if pred_num is not None and target_num is not None:
            if target_num.denominator == 1:
                return pred_num == target_num
            return abs(pred_num - target_num) <= NUMERIC_ABS_TOL
        if _too_costly(pred) or _too_costly(target):
            return False
        return _math_verify_equal(target, pred)
    except (Exception, TimeoutException):  # TimeoutException is a BaseException in math-verify
        return False

"""Scoring answers: score in [0, 1] (needle and key retrieval: 1 if the answer contains the value; multi-value and
variable tracking: the fraction of the expected values/names present; code: difflib edit similarity of the first
answer line) and `correct` (score == 1; for code: the line is reproduced exactly)."""

import difflib
import os
import re
from collections.abc import Sequence

from snapkv.analysis.quality.prompts import QualityPrompt


def contains_score(answer: str, expected: Sequence[str]) -> float:
    """Fraction of the expected strings found in the answer (case-insensitive, as whole tokens)."""
    if not expected:
        raise ValueError("expected is empty")
    text = answer.lower()
    found = [re.search(rf"(?<![0-9a-z]){re.escape(e.lower())}(?![0-9a-z])", text) is not None for e in expected]
    return sum(found) / len(expected)


def prefix_score(answer: str, value: str) -> float:
    """Partial credit for a single value: the length of the longest prefix of `value` that the answer
    reproduces (from its first letter or digit on), over the length of `value`.
    " 344." against "3440437" scores 3/7: the model found the needle but lost its end."""
    if not value:
        raise ValueError("value is empty")
    start = next((i for i, c in enumerate(answer) if c.isalnum()), len(answer))
    return len(os.path.commonprefix([answer[start:].lower(), value.lower()])) / len(value)


def first_code_line(answer: str) -> str:
    """The first line of code in an answer: markdown fences and blank lines skipped."""
    for line in answer.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("```"):
            return stripped
    return ""


def edit_similarity(prediction: str, reference: str) -> float:
    """difflib.SequenceMatcher ratio of the first code line of `prediction` and `reference` (stripped), as
    LongBench scores its code tasks."""
    return difflib.SequenceMatcher(None, first_code_line(prediction), reference.strip()).ratio()


def score_answer(prompt: QualityPrompt, answer: str) -> tuple[float, bool]:
    """(score in [0, 1], correct) of an answer to `prompt`."""
    if prompt.scoring == "edit_similarity":
        score = edit_similarity(answer, prompt.expected[0])
        return score, first_code_line(answer) == prompt.expected[0].strip()
    score = contains_score(answer, prompt.expected)
    return score, score == 1.0



"""The demo pair's checkable reasoning task: left-to-right arithmetic with worked steps.

A problem looks like ``Q:7+5-3+8 A:7+5=12;12-3=9;9+8=17 #17``: single-digit operands, 3 or 4
operations, evaluated left to right. The prompt is everything up to and including ``A:``; the
solution is the worked steps and ``#answer``. Task accuracy is exact match of the final answer.

The held-out test split is defined by the question text itself (a stable hash), so no seed, sampler
or training budget can ever put a test question into training data.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

PROMPT_SUFFIX = " A:"
ANSWER_MARK = " #"
STEP_END_TEXTS = (";", ANSWER_MARK, "#")  # what ends a worked step (span offload and step judging split here)
MAX_SOLUTION_TOKENS = 48  # the longest solution (4 steps, 3-digit totals, answer, EOS) is under 40 tokens
TEST_SHARE_PERCENT = 10  # share of all possible questions reserved for the held-out split
_ANSWER_RE = re.compile(r"#(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One task instance: the question's operands and operators, with derived prompt and solution."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def question(self) -> str:
        parts = [str(self.operands[0])]
        for op, value in zip(self.operators, self.operands[1:]):
            parts += [op, str(value)]
        return "".join(parts)

    @property
    def prompt(self) -> str:
        return f"Q:{self.question}{PROMPT_SUFFIX}"

    @property
    def answer(self) -> int:
        return solve(self.operands, self.operators)[-1]

    @property
    def solution(self) -> str:
        """Worked steps and final answer, e.g. ``7+5=12;12-3=9;9+8=17 #17``."""
        totals = solve(self.operands, self.operators)
        steps, left = [], self.operands[0]
        for op, value, total in zip(self.operators, self.operands[1:], totals):
            steps.append(f"{left}{op}{value}={total}")
            left = total
        return ";".join(steps) + f"{ANSWER_MARK}{totals[-1]}"

    @property
    def text(self) -> str:
        return self.prompt + self.solution


def solve(operands: tuple[int, ...], operators: tuple[str, ...]) -> list[int]:
    """Running totals, left to right (no operator precedence: that is the task's rule)."""
    totals, acc = [], operands[0]
    for op, value in zip(operators, operands[1:]):
        acc = acc + value if op == "+" else acc - value
        totals.append(acc)
    return totals


def is_test_question(question: str) -> bool:
    """True iff the question belongs to the fixed held-out split (stable across runs and machines)."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < TEST_SHARE_PERCENT


def random_problem(rng: random.Random) -> Problem:
    n_ops = rng.choice((3, 4))
    operands = tuple(rng.randint(0, 9) for _ in range(n_ops + 1))
    operators = tuple(rng.choice("+-") for _ in range(n_ops))
    return Problem(operands, operators)


def sample_problems(n: int, split: str, seed: int) -> list[Problem]:
    """``n`` problems of ``split`` ("train" or "test"), drawn with ``seed``; test ones are distinct."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng, out, seen = random.Random(seed), [], set()
    want_test = split == "test"
    while len(out) < n:
        problem = random_problem(rng)
        if is_test_question(problem.question) != want_test:
            continue
        if want_test:  # the evaluation set has no repeats, so accuracy counts distinct questions
            if problem.question in seen:
                continue
            seen.add(problem.question)
        out.append(problem)
    return out


def held_out_problems(n: int = 500) -> list[Problem]:
    """The fixed evaluation set every report uses (seed fixed here, not by the caller)."""
    return sample_problems(n, "test", seed=20241217)


def parse_answer(generated: str) -> int | None:
    """The final answer in a generated solution, or None when there is none."""
    match = _ANSWER_RE.search(generated)
    return int(match.group(1)) if match else None


def is_correct(problem: Problem, generated: str) -> bool:
    return parse_answer(generated) == problem.answer

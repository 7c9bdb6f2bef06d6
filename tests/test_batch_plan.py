"""How the batched engine splits the queued forwards by tail length (``core.batch_plan.plan_forwards``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from core.batch_plan import FORWARD_OVERHEAD_TOKENS, MAX_ROWS, plan_forwards


def cost(tails: list[int], groups: list[list[int]], overhead: int = FORWARD_OVERHEAD_TOKENS) -> int:
    return sum(overhead + len(g) * max(tails[i] for i in g) for g in groups)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=40), st.integers(1, 4096))
def test_every_job_runs_once_within_the_budget_and_no_dearer_than_simple_plans(tails, budget):
    groups = plan_forwards(tails, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(tails)))
    assert all(len(g) == 1 or len(g) * max(tails[i] for i in g) <= budget for g in groups)
    assert cost(tails, groups) <= cost(tails, [[i] for i in range(len(tails))])  # one forward each
    if len(tails) * max(tails) <= budget:
        assert cost(tails, groups) <= cost(tails, [list(range(len(tails)))])  # everything padded together


def test_a_long_prefill_is_not_padded_onto_decode_steps():
    tails = [1] * 30 + [60]
    groups = plan_forwards(tails, 4096)
    assert sorted(len(g) for g in groups) == [1, 30]


def test_equal_tails_share_one_forward():
    assert plan_forwards([2] * 64, 4096) == [list(range(64))]


def test_a_forward_holds_at_most_max_rows():
    groups = plan_forwards([1] * 600, 10**6)
    assert max(len(g) for g in groups) <= MAX_ROWS and sum(map(len, groups)) == 600

"""The one planner of a set's parts: references, chunks, model calls, parts, shares and what a resumed set makes."""

import pytest

from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.transfer import TransferSpec


def test_chunks_and_calls_with_any_number_of_references() -> None:
    plan = SetPlan(7, 2, 2)  # references 0, 1; targets 2..6
    assert plan.references == [0, 1] and plan.chunks == [[2, 3], [4, 5], [6]]
    assert plan.calls() == [[0, 1, 2, 3], [4, 5], [6]]
    assert plan.calls([6]) == [[0, 1, 2, 3], [6]]  # the references always ride with the first chunk
    assert plan.work(steps=3) == 3 * 3 + 7 and plan.work([6], steps=3) == 3 * 2 + 3
    assert SetPlan(1).calls() == [[0]] and SetPlan(2, 2).calls() == [[0, 1]] and SetPlan(3).chunks == [[1, 2]]
    with pytest.raises(ValueError, match="not whole chunks"):
        plan.chunks_of([2])


def test_parts_shares_and_selections() -> None:
    plan = SetPlan(7, 2, 2)
    assert plan.parts() == [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6]]
    assert plan.shares(2) == [[0, 1, 2, 3, 4, 5], [6]] and plan.shares(1) == [list(range(7))]
    assert plan.shares(9) == [[0, 1, 2, 3], [4, 5], [6]]  # at most one share per chunk
    assert plan.select(None) == (None, list(range(7)))
    assert plan.select([0, 1, 4, 5]) == ([4, 5], [0, 1, 4, 5]) and plan.select([6]) == ([6], [6])
    for wrong in ([0, 4, 5], [1, 2, 3], [2], [4, 5, 2, 3], [0, 1, 7], []):
        with pytest.raises(ValueError, match="a part of a set of 7 images"):
            plan.select(wrong)


def test_what_a_resumed_set_makes() -> None:
    plan = SetPlan(7, 2, 2)
    assert plan.covering([]) == [] and plan.covering(range(7)) is None
    assert plan.covering([3]) == [2, 3] and plan.covering([5, 6]) == [4, 5, 6]
    assert plan.covering([1, 6]) == [0, 1, 6] and plan.covering([0]) == [0, 1]
    assert plan.select(plan.covering([1, 6])) == ([6], [0, 1, 6])


def test_specs_plan_their_images() -> None:
    assert SetSpec(prompts=["a", "b", "c"], chunk_size=1).plan() == SetPlan(3, 1, 1)
    weighted = SetSpec(prompts=["c", "d", "e"], reference_prompts=["a", "b"], chunk_size=2)
    assert weighted.plan().shares(2) == [[0, 1, 2, 3], [4]]
    assert TransferSpec(prompts=["c", "d"]).plan() == SetPlan(3, 1, None)  # the image's caption is the reference
    assert TransferSpec(prompts=["c"], reference_prompts=["1", "2"]).plan() == SetPlan(3, 2, None)

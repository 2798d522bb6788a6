"""Which pool images the benchmark's active orders label next (``select_batch``): pure and fast."""

from __future__ import annotations

import numpy as np
import pytest

from seemly.learning.uncertainty import select_batch

SCORES = [0.1, 0.8, 0.3, 0.9, 0.2, 0.5, 0.05, 0.7]


def test_top_is_most_uncertain_first_with_ties_by_index() -> None:
    rng = np.random.default_rng(0)
    assert select_batch(SCORES, 3, rng, "top") == [3, 1, 7]
    assert select_batch([0.5, 0.5, 0.9], 3, rng, "top") == [2, 0, 1]
    assert select_batch(SCORES, 20, rng, "top") == sorted(range(8), key=lambda i: -SCORES[i])
    assert select_batch(SCORES, 0, rng, "top") == []


@pytest.mark.parametrize("strategy", ["weighted", "hybrid"])
def test_sampled_batches_are_distinct_sized_and_seeded(strategy: str) -> None:
    for k in (1, 4, 8, 12):
        picked = select_batch(SCORES, k, np.random.default_rng(3), strategy)
        assert len(picked) == min(k, len(SCORES)) == len(set(picked))
        assert set(picked) <= set(range(len(SCORES)))
        assert picked == select_batch(SCORES, k, np.random.default_rng(3), strategy)


def test_weighted_prefers_uncertain_images_without_excluding_the_others() -> None:
    rng = np.random.default_rng(1)
    scores = [0.9, 0.45, 0.1, 0.0]
    counts = np.zeros(4)
    for _ in range(3000):
        counts[select_batch(scores, 1, rng, "weighted")] += 1
    share = counts / counts.sum()
    # one draw: proportional to the score (0.9 / 1.45 = 0.62, 0.31, 0.07); a zero score is never drawn
    assert share[0] == pytest.approx(0.62, abs=0.04) and share[1] == pytest.approx(0.31, abs=0.04)
    assert 0.03 < share[2] < 0.11 and share[3] == 0
    # all-zero scores: uniform
    flat = np.zeros(4)
    for _ in range(2000):
        flat[select_batch([0.0] * 4, 1, rng, "weighted")] += 1
    assert flat.min() > 400


@pytest.mark.parametrize("strategy", ["weighted", "hybrid"])
def test_last_of_a_sampled_batch_is_any_member_not_the_least_uncertain(strategy: str) -> None:
    """The benchmark's gate image is the batch's last: it must be a uniform pick, as in random order."""
    rng = np.random.default_rng(2)
    least = 0
    for _ in range(1000):
        picked = select_batch(SCORES, 4, rng, strategy)
        least += picked[-1] == min(picked, key=lambda i: SCORES[i])
    assert 180 < least < 320  # about 1 in 4


def test_hybrid_keeps_the_most_uncertain_half() -> None:
    rng = np.random.default_rng(4)
    seen: set[int] = set()
    for _ in range(50):
        picked = select_batch(SCORES, 5, rng, "hybrid")
        assert {3, 1, 7} <= set(picked)  # ceil(5 / 2) = 3 most uncertain
        seen |= set(picked) - {3, 1, 7}
    assert seen == {0, 2, 4, 5, 6}  # the rest is drawn from all the others


def test_bad_input_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown strategy"):
        select_batch(SCORES, 2, rng, "greedy")
    with pytest.raises(ValueError, match="non-negative"):
        select_batch([0.1, -0.2], 1, rng)
    with pytest.raises(ValueError, match="finite"):
        select_batch([0.1, float("nan")], 1, rng)
    with pytest.raises(ValueError, match="k must be"):
        select_batch(SCORES, -1, rng)

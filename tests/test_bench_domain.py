"""The synthetic one-class project of the learning-curve benchmark: deterministic, well-formed."""

from __future__ import annotations

import numpy as np
import pytest

from seemly.bench.domain import HEIGHT, WIDTH, domain_sample, domain_samples


def test_same_seed_same_sample_other_seed_other_sample() -> None:
    a, b, c = domain_sample(3), domain_sample(3), domain_sample(4)
    assert a.stem == b.stem == "beetle0003"
    assert np.array_equal(a.image, b.image) and np.array_equal(a.gt, b.gt)
    assert not np.array_equal(a.image, c.image)


def test_samples_are_well_formed() -> None:
    samples = domain_samples(6, start=10)
    assert [s.stem for s in samples] == [f"beetle{i:04d}" for i in range(10, 16)]
    for sample in samples:
        assert sample.image.shape == (HEIGHT, WIDTH, 3) and sample.image.dtype == np.uint8
        assert sample.gt.shape == (HEIGHT, WIDTH) and sample.gt.dtype == bool
        assert sample.ignore is None
        # one object of a sensible size, not touching the whole frame
        assert 0.01 < sample.gt.mean() < 0.3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="negative"):
        domain_samples(-1)


def test_learning_curve_opens_the_domain_dataset() -> None:
    from tests.fixtures.benchmarks import load_benchmark

    module = load_benchmark("learning_curve")
    dataset = module.open_dataset("domain", 4)
    assert dataset.stems == [f"beetle{i:04d}" for i in range(4)]
    sample = dataset.load("beetle0002")
    assert np.array_equal(sample.gt, domain_sample(2).gt)

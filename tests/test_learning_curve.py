"""The learning-curve benchmark's bookkeeping (no training): seed-matched summaries and the plot."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.fixtures.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def curve_module() -> ModuleType:
    return load_benchmark("learning_curve")


def _curve(order: str, seed: int, nocs: list[float]) -> dict:
    points = [{"round": i, "labelled": 8 * i, "noc90": v, "miou_mean": 0.8} for i, v in enumerate(nocs)]
    return {"order": order, "seed": seed, "label": f"{order} seed {seed}", "points": points}


def test_summary_has_seed_mean_min_max_and_images_to_reach_random(curve_module: ModuleType) -> None:
    curves = [
        _curve("random", 0, [4.0, 3.0, 2.0]),
        _curve("random", 1, [4.0, 3.4, 3.0]),  # random's final mean: 2.5
        _curve("diverse", 0, [4.0, 2.4, 2.2]),
        _curve("diverse", 1, [4.0, 2.6, 2.4]),  # mean 2.5 after 8 images: reaches it first
        _curve("active", 0, [4.0, 4.0, 3.0]),  # never reaches 2.5
    ]
    summary = curve_module.summarize(curves, ["random", "diverse", "active", "hybrid"])
    assert "hybrid" not in summary and summary["random_final_mean"] == pytest.approx(2.5)
    assert summary["random"]["seeds"] == [0, 1]
    assert summary["random"]["rounds"][1] == {
        "labelled": 8,
        "mean": pytest.approx(3.2),
        "min": 3.0,
        "max": 3.4,
    }
    assert summary["random"]["labelled_to_reach_random_final"] == 16
    assert summary["diverse"]["labelled_to_reach_random_final"] == 8
    assert summary["active"]["labelled_to_reach_random_final"] is None
    text = curve_module.format_summary(summary)
    assert "diverse (seeds [0, 1]): 0: 4.00 [4.00-4.00], 8: 2.50 [2.40-2.60]" in text
    assert "reaches random's final mean at None" in text.splitlines()[2]


def test_diverse_is_an_order_and_its_curves_are_drawn(curve_module: ModuleType, tmp_path: Path) -> None:
    assert "diverse" in curve_module.ORDERS and "diverse" in curve_module.SAMPLED_ORDERS
    curves = [_curve(o, s, [4.0, 3.0]) for o in ("random", "active", "diverse") for s in (0, 1)]
    curves += [curve_module.mean_curve(curves[4:], "diverse-mean")]
    assert curves[-1]["points"][1]["noc90"] == pytest.approx(3.0)
    payload = {"baseline": {"noc90": 4.0}, "curves": curves}
    curve_module.plot(payload, tmp_path / "curve.png")
    from PIL import Image

    assert Image.open(tmp_path / "curve.png").size == (760, 440)

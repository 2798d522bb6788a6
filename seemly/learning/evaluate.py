"""Interactive quality of one engine on labelled samples: the gate's and the learning curve's metric.

A thin layer over the benchmark (``seemly.bench.interactive.evaluate_image`` and
``seemly.bench.metrics.summarize``), so a gate decision and ``seemly bench interactive`` can never
disagree: the same simulated clicks, NoC@90 with the ignore band left out where a sample has one,
and mIoU after 1, 3 and 5 clicks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from seemly.bench import metrics
from seemly.bench.datasets import Sample
from seemly.bench.interactive import evaluate_image
from seemly.engines.base import Engine


@dataclass(frozen=True)
class EvalResult:
    """``noc90`` / ``noc85``: mean clicks to IoU 0.90 / 0.85 (``max_clicks`` if never); ``miou``:
    mean IoU after 1, 3 and 5 clicks (keys 1, 3, 5) and ``miou_mean`` their mean; ``failures``:
    samples that never reached 0.90."""

    images: int
    max_clicks: int
    noc90: float
    noc85: float
    miou: dict[int, float]
    failures: int
    rows: list[metrics.ImageResult] = field(default_factory=list, repr=False)

    @property
    def miou_mean(self) -> float:
        return sum(self.miou.values()) / len(self.miou)

    def per_image_noc90(self) -> dict[str, int]:
        return {r.stem: metrics.noc(r.ious, 0.90, self.max_clicks) for r in self.rows}

    def to_dict(self, rows: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "images": self.images,
            "max_clicks": self.max_clicks,
            "noc90": self.noc90,
            "noc85": self.noc85,
            "miou": {str(k): v for k, v in self.miou.items()},
            "miou_mean": self.miou_mean,
            "failures": self.failures,
        }
        if rows:
            data["per_image_noc90"] = self.per_image_noc90()
        return data


def evaluate_engine(engine: Engine, samples: Iterable[Sample], *, max_clicks: int = 20) -> EvalResult:
    """Simulated click sessions on every sample (the benchmark's protocol, clicks only)."""
    if max_clicks < 1:
        raise ValueError("max_clicks must be at least 1")
    rows = [
        evaluate_image(engine.model_version, engine, sample, max_clicks, box=False, scribble=False)
        for sample in samples
    ]
    if not rows:
        raise ValueError("no samples to evaluate on")
    summary = metrics.summarize(engine.model_version, rows, max_clicks)
    return EvalResult(
        images=summary.images,
        max_clicks=max_clicks,
        noc90=summary.noc90,
        noc85=summary.noc85,
        miou=dict(summary.miou),
        failures=summary.failures90,
        rows=rows,
    )

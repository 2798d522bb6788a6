"""Interactive-segmentation metrics: NoC, failures, IoU after k clicks, latency percentiles.

* ``NoC@t`` — the number of clicks until IoU >= t, ``max_clicks`` when never reached (RITM's
  ``_get_noc``), averaged over images;
* ``failures@t`` — images that never reached t within ``max_clicks`` clicks (note: RITM's
  ``over_max`` also counts an image that reached t exactly on the last click; we do not);
* ``mIoU@k`` — mean IoU after k clicks (a session that stopped early keeps its last IoU);
* latency — ``embed`` seconds per image and ``segment`` seconds per click, as p50 / p95;
* box / scribble IoU — one round with the simulated box or scribbles (see ``simulator``).

Every IoU figure is computed twice: without the ignore band (the standard protocol; the plain
names) and over all pixels (the ``_all`` names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

IOU_AFTER = (1, 3, 5)


def noc(ious: Sequence[float], threshold: float, max_clicks: int) -> int:
    """Clicks needed to reach ``threshold`` (1-based), ``max_clicks`` if never reached."""
    for index, value in enumerate(ious[:max_clicks]):
        if value >= threshold:
            return index + 1
    return max_clicks


def reached(ious: Sequence[float], threshold: float, max_clicks: int) -> bool:
    return any(value >= threshold for value in ious[:max_clicks])


def iou_after(ious: Sequence[float], clicks: int) -> float:
    if not ious:
        return 0.0
    return float(ious[min(clicks, len(ious)) - 1])


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


@dataclass
class ImageResult:
    """Everything measured on one image by one engine (JSON-serialisable via :meth:`to_dict`)."""

    engine: str
    stem: str
    height: int
    width: int
    embed_seconds: float
    clicks: list[tuple[int, int, bool]] = field(default_factory=list)  # (row, col, positive)
    ious: list[float] = field(default_factory=list)
    ious_all: list[float] = field(default_factory=list)
    segment_seconds: list[float] = field(default_factory=list)
    box_iou: float | None = None
    box_iou_all: float | None = None
    scribble_iou: float | None = None
    scribble_iou_all: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clicks"] = [[int(r), int(c), bool(p)] for r, c, p in self.clicks]
        return data


@dataclass
class Summary:
    """The aggregate row of one engine over a dataset."""

    engine: str
    images: int
    max_clicks: int
    noc85: float
    noc90: float
    failures90: int
    miou: dict[int, float]
    noc85_all: float
    noc90_all: float
    failures90_all: int
    miou_all: dict[int, float]
    box_iou: float | None
    box_iou_all: float | None
    scribble_iou: float | None
    scribble_iou_all: float | None
    embed_p50: float
    embed_p95: float
    segment_p50: float
    segment_p95: float
    clicks_total: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["miou"] = {str(k): v for k, v in self.miou.items()}
        data["miou_all"] = {str(k): v for k, v in self.miou_all.items()}
        return data


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarize(engine: str, results: Sequence[ImageResult], max_clicks: int) -> Summary:
    if not results:
        raise ValueError("no results to summarise")
    ious = [r.ious for r in results]
    ious_all = [r.ious_all for r in results]
    seconds = [s for r in results for s in r.segment_seconds]
    return Summary(
        engine=engine,
        images=len(results),
        max_clicks=max_clicks,
        noc85=float(np.mean([noc(v, 0.85, max_clicks) for v in ious])),
        noc90=float(np.mean([noc(v, 0.90, max_clicks) for v in ious])),
        failures90=sum(not reached(v, 0.90, max_clicks) for v in ious),
        miou={k: float(np.mean([iou_after(v, k) for v in ious])) for k in IOU_AFTER},
        noc85_all=float(np.mean([noc(v, 0.85, max_clicks) for v in ious_all])),
        noc90_all=float(np.mean([noc(v, 0.90, max_clicks) for v in ious_all])),
        failures90_all=sum(not reached(v, 0.90, max_clicks) for v in ious_all),
        miou_all={k: float(np.mean([iou_after(v, k) for v in ious_all])) for k in IOU_AFTER},
        box_iou=_mean([r.box_iou for r in results]),
        box_iou_all=_mean([r.box_iou_all for r in results]),
        scribble_iou=_mean([r.scribble_iou for r in results]),
        scribble_iou_all=_mean([r.scribble_iou_all for r in results]),
        embed_p50=percentile([r.embed_seconds for r in results], 50),
        embed_p95=percentile([r.embed_seconds for r in results], 95),
        segment_p50=percentile(seconds, 50),
        segment_p95=percentile(seconds, 95),
        clicks_total=len(seconds),
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(summaries: Sequence[Summary]) -> str:
    """Two tables: quality (ignore band left out, then all pixels) and latency."""
    lines = [
        "| engine | NoC@85 | NoC@90 | fail@90 | mIoU@1 | mIoU@3 | mIoU@5 | box IoU | scribble IoU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.engine} | {s.noc85:.2f} | {s.noc90:.2f} | {s.failures90}/{s.images} | "
            f"{s.miou[1]:.3f} | {s.miou[3]:.3f} | {s.miou[5]:.3f} | {_fmt(s.box_iou)} | {_fmt(s.scribble_iou)} |"
        )
    lines += [
        "",
        "All pixels counted (ignore band included):",
        "",
        "| engine | NoC@85 | NoC@90 | fail@90 | mIoU@1 | mIoU@3 | mIoU@5 | box IoU | scribble IoU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.engine} | {s.noc85_all:.2f} | {s.noc90_all:.2f} | {s.failures90_all}/{s.images} | "
            f"{s.miou_all[1]:.3f} | {s.miou_all[3]:.3f} | {s.miou_all[5]:.3f} | {_fmt(s.box_iou_all)} | "
            f"{_fmt(s.scribble_iou_all)} |"
        )
    lines += [
        "",
        "| engine | embed p50 (s) | embed p95 (s) | segment p50 (s/click) | segment p95 (s/click) | clicks run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.engine} | {s.embed_p50:.3f} | {s.embed_p95:.3f} | {s.segment_p50:.3f} | "
            f"{s.segment_p95:.3f} | {s.clicks_total} |"
        )
    return "\n".join(lines) + "\n"

"""``seemly bench everything``: how well segment-everything proposals cover the ground-truth object.

For every image of a dataset (default: the GrabCut set) and every proposer: the proposals, and

* **best IoU**: the IoU of the ground-truth object with the best-matching proposal (the standard
  protocol leaves GrabCut's uncertain boundary band out; ``_all`` counts every pixel), its mean
  and the share of images where it reaches 0.8 and 0.5;
* **top-1 IoU**: the IoU of the highest-scored proposal (does the ranking put the object first?);
* proposals per image, and seconds per image (for an engine: ``embed`` + ``segment_everything``).

Proposers: any registered engine name (its ``segment_everything``: ``classic``, ``sam`` with
``--checkpoint``) and ``everything``, the hierarchical proposer of :mod:`seemly.engines.everything`
run on the image alone.

    seemly bench everything --proposer classic,everything --markdown out.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seemly.bench.datasets import Dataset, Sample
from seemly.masks import Mask

DEFAULT_DATASET = Path("/work/shared/data/grabcut")

Proposer = Callable[[np.ndarray], list[tuple[np.ndarray, float]]]


@dataclass
class ImageRow:
    proposer: str
    stem: str
    best_iou: float
    best_iou_all: float
    top1_iou: float
    proposals: int
    seconds: float


@dataclass
class Summary:
    proposer: str
    images: int
    mean_best_iou: float
    share_best_iou_08: float
    share_best_iou_05: float
    mean_best_iou_all: float
    mean_top1_iou: float
    proposals_per_image: float
    seconds_per_image: float


def make_proposer(name: str, checkpoint: str | None = None) -> Proposer:
    if name == "everything":
        from seemly.engines.everything import propose

        return lambda image: propose(image)
    from seemly.engines.base import create_engine

    options: dict[str, Any] = {"checkpoint": checkpoint} if checkpoint else {}
    engine = create_engine(name, **options)

    def run(image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        state = engine.embed(image, hashlib.sha256(image.tobytes()).hexdigest())
        return [(np.asarray(s.mask.data), float(s.score)) for s in engine.segment_everything(state)]

    return run


def evaluate(name: str, proposer: Proposer, sample: Sample) -> ImageRow:
    started = time.perf_counter()
    proposals = proposer(sample.image)
    seconds = time.perf_counter() - started
    gt = Mask(sample.gt)
    ious = [gt.iou(Mask(mask), sample.ignore) for mask, _ in proposals]
    ious_all = [gt.iou(Mask(mask)) for mask, _ in proposals]
    top = int(np.argmax([score for _, score in proposals])) if proposals else -1
    return ImageRow(
        proposer=name,
        stem=sample.stem,
        best_iou=max(ious, default=0.0),
        best_iou_all=max(ious_all, default=0.0),
        top1_iou=ious[top] if top >= 0 else 0.0,
        proposals=len(proposals),
        seconds=seconds,
    )


def summarize(name: str, rows: list[ImageRow]) -> Summary:
    best = np.array([r.best_iou for r in rows])
    return Summary(
        proposer=name,
        images=len(rows),
        mean_best_iou=float(best.mean()),
        share_best_iou_08=float((best >= 0.8).mean()),
        share_best_iou_05=float((best >= 0.5).mean()),
        mean_best_iou_all=float(np.mean([r.best_iou_all for r in rows])),
        mean_top1_iou=float(np.mean([r.top1_iou for r in rows])),
        proposals_per_image=float(np.mean([r.proposals for r in rows])),
        seconds_per_image=float(np.mean([r.seconds for r in rows])),
    )


def markdown_table(summaries: list[Summary]) -> str:
    lines = [
        "| proposer | images | best IoU (mean) | best IoU >= 0.8 | best IoU >= 0.5 | best IoU, all pixels "
        "| top-1 IoU | proposals / image | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.proposer} | {s.images} | {s.mean_best_iou:.3f} | {100 * s.share_best_iou_08:.0f} % "
            f"| {100 * s.share_best_iou_05:.0f} % | {s.mean_best_iou_all:.3f} | {s.mean_top1_iou:.3f} "
            f"| {s.proposals_per_image:.1f} | {s.seconds_per_image:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_benchmark(
    dataset: Dataset, proposers: dict[str, Proposer], progress: bool = False
) -> tuple[list[Summary], list[ImageRow]]:
    rows: dict[str, list[ImageRow]] = {name: [] for name in proposers}
    for sample in dataset:
        for name, proposer in proposers.items():
            rows[name].append(evaluate(name, proposer, sample))
            if progress:
                print(f"{name} {sample.stem}: best IoU {rows[name][-1].best_iou:.3f}", file=sys.stderr)
    return [summarize(name, r) for name, r in rows.items()], [row for r in rows.values() for row in r]


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    parser.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET if DEFAULT_DATASET.is_dir() else None,
        help="folder with images/, masks/ and optional ignore/ (default: %(default)s)",
    )
    parser.add_argument(
        "--proposer", default="classic,everything", help="comma-separated engines and/or 'everything'"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by stem)")
    parser.add_argument("--checkpoint", default=None, help="weights URI for engines that need them")
    parser.add_argument("--json", type=Path, default=None, help="write summaries and per-image rows here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--progress", action="store_true", help="one line per image on stderr")


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    if args.dataset is None:
        print("no --dataset given and the default GrabCut folder does not exist", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.proposer.split(",") if n.strip()]
    if not names:
        print("--proposer names nothing", file=sys.stderr)
        return 2
    dataset = Dataset(args.dataset, args.limit)
    proposers = {name: make_proposer(name, args.checkpoint) for name in names}
    summaries, rows = run_benchmark(dataset, proposers, progress=args.progress)
    header = (
        f"Dataset `{dataset.root}` ({len(dataset)} images), {platform.machine()} "
        f"Python {platform.python_version()}\n\n"
    )
    table = markdown_table(summaries)
    print(header + table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "dataset": str(dataset.root),
            "summaries": [asdict(s) for s in summaries],
            "results": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0

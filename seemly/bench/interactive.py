"""``seemly bench interactive``: the NoC benchmark of interactive engines, side by side.

For every image of the dataset and every engine: ``embed`` once (timed), then the standard click
simulation (``seemly.bench.simulator``) up to ``--max-clicks``, then one round with the tight box
and one with simulated scribbles. Prints (and optionally writes) a markdown table and all
per-image results as JSON. Deterministic: same dataset, engines and options give the same numbers
(timings aside).

    seemly bench interactive --dataset /work/shared/data/grabcut --engine classic,grabcut,randomwalker
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from seemly.bench import metrics, simulator
from seemly.bench.datasets import Dataset, Sample
from seemly.bench.machine import cpu_model
from seemly.engines.base import Engine, EngineError, create_engine
from seemly.masks import Mask
from seemly.prompts import PromptRound

DEFAULT_DATASET = Path("/work/shared/data/grabcut")


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    parser.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET if DEFAULT_DATASET.is_dir() else None,
        help="folder with images/, masks/ and optional ignore/ (default: %(default)s)",
    )
    parser.add_argument("--engine", default="classic", help="comma-separated engines run side by side")
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by stem)")
    parser.add_argument("--checkpoint", default=None, help="weights URI for engines that need them (sam)")
    parser.add_argument(
        "--clip-checkpoint",
        default=None,
        help="open_clip weights URI (path, file:// or s3://) for the 'semantic' engine's text prompts",
    )
    parser.add_argument(
        "--clip-model", default="ViT-B-32", help="open_clip architecture of --clip-checkpoint"
    )
    parser.add_argument(
        "--clip-config",
        default=None,
        help="open_clip model config JSON (a custom architecture; overrides --clip-model)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write summaries and per-image results here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    parser.add_argument(
        "--all-clicks",
        action="store_true",
        help="always run max-clicks clicks (default: stop once IoU >= 0.90 after 5 clicks; same metrics)",
    )
    parser.add_argument("--no-box", action="store_true", help="skip the box-prompt round")
    parser.add_argument("--no-scribble", action="store_true", help="skip the scribble-prompt round")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _engines(
    names: list[str], checkpoint: str | None, clip: dict[str, Any] | None = None
) -> dict[str, Engine]:
    """The engines by name; ``clip`` (``clip``, ``clip_model``, ``clip_config``) goes to 'semantic' only."""
    import seemly.bench.baselines  # noqa: F401  (registers "grabcut" and "randomwalker")

    options: dict[str, Any] = {"checkpoint": checkpoint} if checkpoint else {}
    extra = {"semantic": clip} if clip and clip.get("clip") else {}
    return {name: create_engine(name, **options, **extra.get(name, {})) for name in names}


def evaluate_image(
    engine_name: str,
    engine: Engine,
    sample: Sample,
    max_clicks: int,
    stop_early: bool = True,
    box: bool = True,
    scribble: bool = True,
) -> metrics.ImageResult:
    """Everything measured for one engine on one image."""
    sha256 = hashlib.sha256(sample.image.tobytes()).hexdigest()
    start = time.perf_counter()
    state = engine.embed(sample.image, sha256)
    embed_seconds = time.perf_counter() - start
    trace = simulator.simulate_clicks(
        engine,
        state,
        sample.gt,
        sample.ignore,
        max_clicks=max_clicks,
        stop_iou=0.90 if stop_early else None,
        min_clicks=max(metrics.IOU_AFTER),
    )
    result = metrics.ImageResult(
        engine=engine_name,
        stem=sample.stem,
        height=sample.height,
        width=sample.width,
        embed_seconds=embed_seconds,
        clicks=[(c.row, c.col, c.positive) for c in trace.clicks],
        ious=trace.ious,
        ious_all=trace.ious_all,
        segment_seconds=trace.seconds,
    )
    gt = Mask(sample.gt.copy())
    if box:
        segments = engine.segment(state, PromptRound(prompts=[simulator.box_prompt(sample.gt)]))
        result.box_iou = gt.iou(segments[0].mask, sample.ignore)
        result.box_iou_all = gt.iou(segments[0].mask)
    if scribble:
        prompts = simulator.scribble_prompts(sample.gt)
        segments = engine.segment(state, PromptRound(prompts=prompts))
        result.scribble_iou = gt.iou(segments[0].mask, sample.ignore)
        result.scribble_iou_all = gt.iou(segments[0].mask)
    return result


def run_benchmark(
    dataset: Dataset,
    engines: dict[str, Engine],
    max_clicks: int = 20,
    stop_early: bool = True,
    box: bool = True,
    scribble: bool = True,
    progress: bool = True,
) -> tuple[list[metrics.Summary], list[metrics.ImageResult]]:
    from tqdm import tqdm

    results: dict[str, list[metrics.ImageResult]] = {name: [] for name in engines}
    bar = tqdm(total=len(dataset) * len(engines), disable=not progress, unit="run", file=sys.stderr)
    for sample in dataset:
        for name, engine in engines.items():
            bar.set_description(f"{name} {sample.stem}")
            results[name].append(evaluate_image(name, engine, sample, max_clicks, stop_early, box, scribble))
            bar.update(1)
    bar.close()
    summaries = [metrics.summarize(name, rows, max_clicks) for name, rows in results.items()]
    return summaries, [row for rows in results.values() for row in rows]


def machine_description() -> str:
    """CPU model, core count and Python version, for the record next to the numbers."""
    model = cpu_model(platform.processor() or platform.machine())
    return f"{model}, {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}"


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    if args.dataset is None:
        print("no --dataset given and the default GrabCut folder does not exist", file=sys.stderr)
        return 2
    names = [name.strip() for name in args.engine.split(",") if name.strip()]
    if not names:
        print("--engine names no engine", file=sys.stderr)
        return 2
    if args.max_clicks < 1:
        print("--max-clicks must be at least 1", file=sys.stderr)
        return 2
    dataset = Dataset(args.dataset, args.limit)
    clip = {"clip": args.clip_checkpoint, "clip_model": args.clip_model, "clip_config": args.clip_config}
    if args.clip_checkpoint and "semantic" not in names:
        print("--clip-checkpoint is used by the 'semantic' engine: add it to --engine", file=sys.stderr)
        return 2
    try:
        engines = _engines(names, args.checkpoint, clip)
    except EngineError as exc:  # missing weights, wrong architecture, ...: a message, not a traceback
        print(f"cannot create the engines: {exc}", file=sys.stderr)
        return 2
    summaries, rows = run_benchmark(
        dataset,
        engines,
        max_clicks=args.max_clicks,
        stop_early=not args.all_clicks,
        box=not args.no_box,
        scribble=not args.no_scribble,
        progress=not args.quiet,
    )
    table = metrics.markdown_table(summaries)
    header = (
        f"Dataset `{dataset.root}` ({len(dataset)} images), max {args.max_clicks} clicks; "
        f"{machine_description()}\n\n"
    )
    print(header + table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "dataset": str(dataset.root),
            "images": len(dataset),
            "max_clicks": args.max_clicks,
            "engines": names,
            "summaries": [s.to_dict() for s in summaries],
            "results": [r.to_dict() for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0

"""``seemly bench reference``: reference-image prompts on pairs with a known answer.

Every pair is (reference image, reference mask) -> (target image, target ground truth). The answer
is the first segment of a reference-only round of :class:`~seemly.engines.semantic.SemanticEngine`
over the classic engine; its IoU with the ground truth is reported per kind of pair (a round that
finds nothing counts as IoU 0).

Pairs:

* ``grabcut-flip`` / ``grabcut-scale`` / ``grabcut-jitter`` / ``grabcut-all``: a GrabCut image and
  its ground truth as the reference; the target is the same image mirrored, rescaled to 60 %,
  colour-jittered (brightness, contrast, hue), or all three (GrabCut's boundary band is left out of
  IoU, as in the interactive benchmark);
* ``synthetic-textured``: textured objects cut from scikit-image samples, pasted on one background
  for the reference and at another place and scale on another background, among distractors;
* ``synthetic-flat``: flat-coloured shapes (no local features to match): colour, texture and shape
  statistics alone.

Modes: ``full`` (colour model + ORB placements) and ``appearance`` (no local features). Proposals:
the classic engine's ``segment_everything`` (``classic``) or :mod:`seemly.engines.everything`
(``everything``).

    seemly bench reference --limit 10 --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from seemly.bench.datasets import Dataset
from seemly.engines.base import EngineError, Segment, UnsupportedPromptError
from seemly.engines.classic import ClassicEngine, ClassicState
from seemly.engines.semantic import SemanticEngine
from seemly.masks import Mask
from seemly.prompts import PromptRound

DEFAULT_DATASET = Path("/work/shared/data/grabcut")
GRABCUT_KINDS = ("flip", "scale", "jitter", "all")


@dataclass
class Pair:
    kind: str
    name: str
    ref_image: np.ndarray
    ref_mask: np.ndarray
    target: np.ndarray
    truth: np.ndarray
    ignore: np.ndarray | None = None


@dataclass
class Row:
    setup: str
    kind: str
    name: str
    iou: float
    found: bool
    seconds: float


class EverythingClassic(ClassicEngine):
    """The classic engine with :mod:`seemly.engines.everything` as its segment-everything."""

    def segment_everything(self, state):  # type: ignore[override]
        from seemly.engines.everything import propose

        state = self._check_state(state)
        assert isinstance(state, ClassicState) and state.image is not None
        return [Segment(Mask(m), s, self.model_version) for m, s in propose(state.image)]


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-12, 13))) % 180
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    contrast = float(rng.uniform(0.75, 1.25))
    brightness = float(rng.uniform(-25, 25))
    return np.clip((out - 128) * contrast + 128 + brightness, 0, 255).astype(np.uint8)


def _resize(array: np.ndarray, factor: float, nearest: bool = False) -> np.ndarray:
    h, w = array.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if nearest:
        return cv2.resize(array.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


def grabcut_pairs(root: Path, limit: int | None, seed: int = 0) -> Iterator[Pair]:
    rng = np.random.default_rng(seed)
    for sample in Dataset(root, limit):
        for kind in GRABCUT_KINDS:
            image, truth = sample.image, sample.gt
            ignore = sample.ignore if sample.ignore is not None else np.zeros_like(truth)
            if kind in ("flip", "all"):
                image, truth, ignore = image[:, ::-1], truth[:, ::-1], ignore[:, ::-1]
            if kind in ("scale", "all"):
                image, truth, ignore = (
                    _resize(image, 0.6),
                    _resize(truth, 0.6, True),
                    _resize(ignore, 0.6, True),
                )
            if kind in ("jitter", "all"):
                image = jitter(np.ascontiguousarray(image), rng)
            yield Pair(
                f"grabcut-{kind}",
                sample.stem,
                sample.image,
                sample.gt,
                np.ascontiguousarray(image),
                np.ascontiguousarray(truth),
                np.ascontiguousarray(ignore),
            )


def _textures() -> list[np.ndarray]:
    from skimage import data

    def tint(gray: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
        g = gray.astype(np.float32) / 255.0
        return np.clip(np.stack([g * c for c in colour], axis=2), 0, 255).astype(np.uint8)

    return [
        tint(data.grass(), (140, 200, 120)),
        tint(data.brick(), (220, 170, 140)),
        tint(data.gravel(), (200, 200, 210)),
        data.coffee()[::2, ::2],
    ]


def _objects() -> list[tuple[str, np.ndarray]]:
    from skimage import data

    return [
        ("astronaut", data.astronaut()[30:230, 140:330]),
        ("coffee-cup", data.coffee()[60:350, 180:460]),
        ("cat", data.chelsea()[20:280, 80:330]),
        ("rocket", data.rocket()[60:420, 200:380]),
    ]


def _background(texture: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    th, tw = texture.shape[:2]
    y = int(rng.integers(0, max(1, th - height)))
    x = int(rng.integers(0, max(1, tw - width)))
    crop = texture[y : y + height, x : x + width]
    return (
        cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
        if crop.shape[:2] != (height, width)
        else crop.copy()
    )


def _paste(image: np.ndarray, obj: np.ndarray, cx: int, cy: int, scale: float) -> np.ndarray:
    o = _resize(obj, scale)
    h, w = o.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    ellipse = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
    y0, x0 = cy - h // 2, cx - w // 2
    image[y0 : y0 + h, x0 : x0 + w][ellipse] = o[ellipse]
    mask = np.zeros(image.shape[:2], bool)
    mask[y0 : y0 + h, x0 : x0 + w] = ellipse
    return mask


def _flat(image: np.ndarray, shape: str, cx: int, cy: int, size: int, colour, rng) -> np.ndarray:
    canvas = np.zeros(image.shape[:2], np.uint8)
    if shape == "disc":
        cv2.circle(canvas, (cx, cy), size, 1, -1)
    elif shape == "square":
        cv2.rectangle(canvas, (cx - size, cy - size), (cx + size, cy + size), 1, -1)
    else:
        pts = np.array([[cx, cy - size], [cx - size, cy + size], [cx + size, cy + size]], np.int32)
        cv2.fillPoly(canvas, [pts], 1)
    mask = canvas.astype(bool)
    noise = rng.normal(0, 6, (int(mask.sum()), 3))
    image[mask] = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    return mask


def synthetic_pairs(count: int, seed: int = 0) -> Iterator[Pair]:
    rng = np.random.default_rng(seed)
    textures = _textures()
    objects = _objects()
    height, width = 360, 480
    for i in range(count):
        name, obj = objects[i % len(objects)]
        t_ref, t_tgt = rng.choice(len(textures), size=2, replace=False)
        ref = _background(textures[t_ref], height, width, rng)
        s_ref = 160 / max(obj.shape[:2])
        ref_mask = _paste(ref, obj, int(rng.integers(100, 380)), int(rng.integers(100, 260)), s_ref)
        target = _background(textures[t_tgt], height, width, rng)
        s_tgt = s_ref * float(rng.uniform(0.6, 1.3))
        # a distractor: another sample object on the left, the object itself on the right
        other = objects[(i + 1) % len(objects)][1]
        _paste(target, other, 110, int(rng.integers(100, 260)), 140 / max(other.shape[:2]))
        truth = _paste(target, obj, 350, int(rng.integers(110, 250)), s_tgt)
        yield Pair("synthetic-textured", f"{name}-{i}", ref, ref_mask, target, truth)
    shapes = [("disc", (200, 30, 35)), ("square", (35, 60, 200)), ("triangle", (40, 170, 40))]
    for i in range(count):
        shape, colour = shapes[i % len(shapes)]
        t_ref, t_tgt = rng.choice(len(textures) - 1, size=2, replace=False)
        ref = _background(textures[t_ref], height, width, rng)
        ref_mask = _flat(ref, shape, int(rng.integers(80, 400)), int(rng.integers(80, 280)), 50, colour, rng)
        target = _background(textures[t_tgt], height, width, rng)
        for j, (other, other_colour) in enumerate(s for s in shapes if s[0] != shape):
            _flat(target, other, 90 + 150 * j, 90, 40, other_colour, rng)
        truth = _flat(target, shape, 380, int(rng.integers(200, 280)), int(rng.integers(30, 70)), colour, rng)
        yield Pair("synthetic-flat", f"{shape}-{i}", ref, ref_mask, target, truth)


def evaluate(setup: str, engine: SemanticEngine, pair: Pair) -> Row:
    images = {"bench://reference": pair.ref_image}
    engine.image_loader = images.__getitem__
    engine._references.clear()  # each pair is a new reference
    prompt = PromptRound(
        prompts=[
            {"kind": "reference", "image_uri": "bench://reference", "rle": Mask(pair.ref_mask).to_coco_rle()}
        ]
    )
    state = engine.embed(pair.target, f"{pair.kind}-{pair.name}".ljust(64, "0")[:64])
    engine.segment_everything(state)  # proposals are part of embedding time, not of the prompt's
    started = time.perf_counter()
    try:
        segments = engine.segment(state, prompt)
    except (UnsupportedPromptError, EngineError):
        return Row(setup, pair.kind, pair.name, 0.0, False, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    iou = Mask(pair.truth).iou(segments[0].mask, pair.ignore)
    return Row(setup, pair.kind, pair.name, iou, True, seconds)


def summarize(rows: list[Row]) -> list[dict[str, object]]:
    out = []
    keys = sorted({(r.setup, r.kind) for r in rows})
    for setup, kind in keys:
        sel = [r for r in rows if r.setup == setup and r.kind == kind]
        ious = np.array([r.iou for r in sel])
        out.append(
            {
                "setup": setup,
                "kind": kind,
                "pairs": len(sel),
                "mean_iou": float(ious.mean()),
                "share_iou_08": float((ious >= 0.8).mean()),
                "found": float(np.mean([r.found for r in sel])),
                "seconds": float(np.mean([r.seconds for r in sel])),
            }
        )
    return out


def markdown_table(summary: list[dict[str, object]]) -> str:
    lines = [
        "| setup | pairs | kind | IoU (mean) | IoU >= 0.8 | answered | s / prompt |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['setup']} | {s['pairs']} | {s['kind']} | {s['mean_iou']:.3f} | {100 * s['share_iou_08']:.0f} % "
            f"| {100 * s['found']:.0f} % | {s['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    parser.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET if DEFAULT_DATASET.is_dir() else None,
        help="GrabCut-layout folder for the same-image pairs (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N GrabCut images")
    parser.add_argument("--synthetic", type=int, default=12, help="synthetic pairs of each kind")
    parser.add_argument("--modes", default="full,appearance", help="full and/or appearance")
    parser.add_argument("--proposals", default="classic", help="classic and/or everything")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    proposals = [p.strip() for p in args.proposals.split(",") if p.strip()]
    if not set(modes) <= {"full", "appearance"} or not set(proposals) <= {"classic", "everything"}:
        print("--modes takes full,appearance and --proposals classic,everything", file=sys.stderr)
        return 2
    pairs: list[Pair] = []
    if args.dataset is not None:
        pairs += list(grabcut_pairs(args.dataset, args.limit))
    pairs += list(synthetic_pairs(args.synthetic))
    rows: list[Row] = []
    for proposer in proposals:
        base = EverythingClassic() if proposer == "everything" else ClassicEngine()
        for mode in modes:
            engine = SemanticEngine(base, None, labels=[], embedder=False, keypoints=mode == "full")
            setup = f"{mode} / {proposer} proposals"
            for pair in pairs:
                rows.append(evaluate(setup, engine, pair))
    summary = summarize(rows)
    header = f"{len(pairs)} pairs, {platform.machine()} Python {platform.python_version()}\n\n"
    table = markdown_table(summary)
    print(header + table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0

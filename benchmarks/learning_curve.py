"""The learning curve of the classic engine's refiner: simulated annotators on GrabCut or a synthetic project.

    .venv/bin/python benchmarks/learning_curve.py                 # 5 rounds x 6 images, random + active
    .venv/bin/python benchmarks/learning_curve.py --quick         # 2 rounds x 4 images, smaller fits
    .venv/bin/python benchmarks/learning_curve.py --dataset domain  # the synthetic one-class project

``--dataset domain`` replaces GrabCut by ``seemly.bench.domain``: 90 generated images of one object
class (60 pool, 30 test), the shape of a real labelling project; there the refiner sees the RGB
planes (``--image``, off by default on GrabCut, where it overfitted). The 50 GrabCut images are split deterministically (by the sha256 of the stem) into a labelling
pool of 30 and 20 held-out *test* images nobody ever labels. Each round, the simulated annotators
label the next ``--batch`` pool images: random order (one seeded shuffle per ``--seeds``) or active
order (the pool images the served engine is least sure about, ``image_uncertainty`` of the
current and the previous version), or ``weighted`` / ``hybrid`` / ``diverse`` order
(``seemly.learning.selection.select_batch``: drawn with probability proportional to that
uncertainty; half most uncertain and half random; or uncertainty-weighted k-means++ over each
image's appearance features, away from the images labelled so far). Every order runs once per
``--seeds`` (seed s: the order's draw, the simulated sessions and the fits), so orders are compared
seed by seed; the JSON's ``summary`` has the seed-mean/min/max per round. Each labelled image becomes "corrections": training examples
from simulated click sessions of the *served* engine (``simulate_examples``), except that one
image per batch joins a gate set instead. :func:`train_gate_promote` (the one step the full
pipeline, ``workers.train``, replaces) fine-tunes the served refiner on all examples so far,
measures candidate and current on the gate set and promotes by ``seemly.learning.gate.decide``.
After every round the promoted engine's NoC@90 and mIoU on the test images are recorded, next to
the untrained engine's. Results go to JSON and a PNG plot (drawn with Pillow).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seemly.bench.datasets import Dataset, Sample  # noqa: E402
from seemly.bench.domain import domain_samples  # noqa: E402
from seemly.bench.interactive import machine_description  # noqa: E402
from seemly.engines.classic import ClassicEngine  # noqa: E402
from seemly.learning.evaluate import EvalResult, evaluate_engine  # noqa: E402
from seemly.learning.examples import RefineExample, simulate_examples  # noqa: E402
from seemly.learning.fit import FitConfig, fit_refiner  # noqa: E402
from seemly.learning.gate import Decision, EvalMetrics, GatePolicy, decide  # noqa: E402
from seemly.learning.refiner import LearnedRefiner, RefinerConfig  # noqa: E402
from seemly.learning.selection import image_features, select_batch  # noqa: E402
from seemly.learning.uncertainty import image_uncertainty  # noqa: E402

DEFAULT_DATASET = Path("/work/shared/data/grabcut")


class DomainDataset:
    """The synthetic one-class project of ``seemly.bench.domain``, behind ``Dataset``'s ``stems``/``load``."""

    def __init__(self, count: int) -> None:
        self._samples = {s.stem: s for s in domain_samples(count)}
        self.stems = sorted(self._samples)
        self.root = Path("synthetic:seemly.bench.domain")
        self.name = "domain"

    def load(self, stem: str) -> Sample:
        return self._samples[stem]


def open_dataset(name: str, count: int) -> Dataset | DomainDataset:
    """``grabcut`` (the default folder), ``domain`` (synthetic, ``count`` images) or a dataset folder."""
    if name == "domain":
        return DomainDataset(count)
    return Dataset(DEFAULT_DATASET if name == "grabcut" else Path(name))


def split(stems: list[str], pool: int) -> tuple[list[str], list[str]]:
    """(labelling pool, test images): a deterministic split that does not depend on file order."""
    ordered = sorted(stems, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return ordered[:pool], ordered[pool:]


@dataclass
class Served:
    """The promoted state of the simulated project."""

    refiner: LearnedRefiner | None = None
    previous: LearnedRefiner | None = None
    version: int = 0  # 0 = the untrained engine

    def engine(self) -> ClassicEngine:
        return ClassicEngine(refiner=self.refiner)


@dataclass
class RoundOutcome:
    candidate: LearnedRefiner
    decision: Decision
    fit_seconds: float
    gate_seconds: float
    train_log: list[dict[str, Any]] = field(default_factory=list)


def train_gate_promote(
    served: Served,
    examples: list[RefineExample],
    gate_samples: list[Sample],
    fit_config: FitConfig,
    policy: GatePolicy,
    max_clicks: int,
) -> RoundOutcome:
    """One training round: fine-tune the served refiner, gate candidate vs served, maybe promote.

    The swap point for the full pipeline (``workers.train``: Ray Train fit + gate + registry)."""
    log: list[dict[str, Any]] = []
    started = time.perf_counter()
    candidate = fit_refiner(examples, fit_config, init=served.refiner, report=lambda m, _: log.append(m))
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    current = evaluate_engine(served.engine(), gate_samples, max_clicks=max_clicks)
    challenger = evaluate_engine(ClassicEngine(refiner=candidate), gate_samples, max_clicks=max_clicks)
    decision = decide(EvalMetrics.from_result(challenger), EvalMetrics.from_result(current), policy)
    if decision.promote:
        served.previous, served.refiner = served.refiner, candidate
        served.version += 1
    return RoundOutcome(candidate, decision, fit_seconds, time.perf_counter() - started, log)


def order_active(served: Served, pool: list[Sample], seed: int) -> list[tuple[float, Sample]]:
    """Pool images, most uncertain first (current vs previous version when there is one)."""
    engines = [served.engine()]
    if served.refiner is not None:
        engines.append(ClassicEngine(refiner=served.previous))
    scored = []
    for sample in pool:
        sha = hashlib.sha256(sample.image.tobytes()).hexdigest()
        scored.append((image_uncertainty(engines, sample.image, sha, seed=seed, probes=2).score, sample))
    return sorted(scored, key=lambda item: (-item[0], item[1].stem))


SAMPLED_ORDERS = ("weighted", "hybrid", "diverse")  # select_batch strategies, drawn per seed
# auto: diverse while nothing is promoted (cold start: the untrained engine's uncertainty picks
# outlier batches), the most uncertain (active) once a version is (as `seemly al next --strategy auto`)
ORDERS = ("random", "active", *SAMPLED_ORDERS, "auto")


def run_curve(
    dataset: Dataset | DomainDataset,
    pool_stems: list[str],
    test: list[Sample],
    *,
    order: str,
    seed: int,
    rounds: int,
    batch: int,
    fit_config: FitConfig,
    refiner_config: RefinerConfig,
    policy: GatePolicy,
    sessions: int,
    max_clicks: int,
    baseline: EvalResult,
    eval_candidates: bool = False,
    gate_per_batch: int = 1,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    remaining = [dataset.load(stem) for stem in pool_stems]
    if order == "random":
        remaining = [remaining[i] for i in rng.permutation(len(remaining))]
    # diverse order: appearance features, once per image (they do not depend on the model)
    features = {s.stem: image_features(s.image) for s in remaining} if order in ("diverse", "auto") else {}
    labelled: list[str] = []
    served = Served()
    examples: list[RefineExample] = []
    gate_samples: list[Sample] = []
    evaluated: dict[int, EvalResult] = {0: baseline}
    points = [{"round": 0, "labelled": 0, "version": 0, **baseline.to_dict()}]
    for round_index in range(1, rounds + 1):
        if not remaining:
            break
        started = time.perf_counter()
        strategy = order
        if order == "auto":
            strategy = "diverse" if served.version == 0 else "active"
        if strategy == "active":
            ranked = order_active(served, remaining, seed)
            chosen = [sample for _, sample in ranked[:batch]]
            uncertainty = {s.stem: round(u, 4) for u, s in ranked[:batch]}
        elif strategy in SAMPLED_ORDERS:
            ranked = order_active(served, remaining, seed)
            picked = select_batch(
                [u for u, _ in ranked],
                batch,
                rng,
                strategy,
                features=[features[s.stem] for _, s in ranked] if features else None,
                labelled=[features[stem] for stem in labelled] if features else None,
            )
            chosen = [ranked[i][1] for i in picked]
            uncertainty = {ranked[i][1].stem: round(ranked[i][0], 4) for i in picked}
        else:
            chosen, uncertainty = remaining[:batch], {}
        remaining = [s for s in remaining if s.stem not in {c.stem for c in chosen}]
        labelled += [s.stem for s in chosen]
        rank_seconds = time.perf_counter() - started
        # the last gate_per_batch images join the gate set, the others become training examples
        gate_samples.extend(chosen[-gate_per_batch:])
        started = time.perf_counter()
        engine = served.engine()
        for sample in chosen[:-gate_per_batch]:
            examples += simulate_examples(
                engine,
                sample.image,
                sample.gt,
                rng=np.random.default_rng([seed, round_index, len(examples)]),
                max_clicks=8,
                sessions=sessions,
                config=refiner_config,
                source=sample.stem,
            )
        simulate_seconds = time.perf_counter() - started
        outcome = train_gate_promote(
            served,
            examples,
            gate_samples,
            fit_config.model_copy(update={"seed": seed + round_index}),
            policy,
            max_clicks,
        )
        started = time.perf_counter()
        if served.version not in evaluated:
            evaluated[served.version] = evaluate_engine(served.engine(), test, max_clicks=max_clicks)
        test_seconds = time.perf_counter() - started
        result = evaluated[served.version]
        candidate_test = None
        if eval_candidates and not outcome.decision.promote:
            candidate_test = evaluate_engine(
                ClassicEngine(refiner=outcome.candidate), test, max_clicks=max_clicks
            )
        point = {
            "round": round_index,
            "labelled": round_index * batch,
            "labelled_stems": [s.stem for s in chosen],
            "uncertainty": uncertainty,
            "examples": len(examples),
            "version": served.version,
            "promoted": outcome.decision.promote,
            "gate": outcome.decision.reason,
            "train_loss": [m["loss"] for m in outcome.train_log],
            "seconds": {
                "rank": rank_seconds,
                "simulate": simulate_seconds,
                "fit": outcome.fit_seconds,
                "gate": outcome.gate_seconds,
                "test": test_seconds,
            },
            **result.to_dict(),
        }
        if eval_candidates:  # what the gate kept out (or let in) would have done on the test images
            point["candidate"] = (candidate_test or result).to_dict()
        points.append(point)
        print(
            f"[{order} seed {seed}] round {round_index}: {len(examples)} examples, gate: {outcome.decision.reason}; "
            f"test NoC@90 {result.noc90:.2f} (untrained {baseline.noc90:.2f}), mIoU {result.miou_mean:.3f} "
            f"({', '.join(f'{k} {v:.0f}s' for k, v in point['seconds'].items())})",
            flush=True,
        )
    return {"order": order, "seed": seed, "points": points}


def plot(payload: dict[str, Any], path: Path) -> None:
    """NoC@90 on the test images vs labelled images, one line per curve (Pillow, no matplotlib)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 440, 70, 190, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    curves = payload["curves"]
    xs = [p["labelled"] for c in curves for p in c["points"]]
    ys = [p["noc90"] for c in curves for p in c["points"]] + [
        payload["baseline"]["noc90"] * k for k in (1, 0.8)
    ]
    ys += [p["candidate"]["noc90"] for c in curves for p in c["points"] if "candidate" in p]
    x_max = max(xs) or 1
    y_lo, y_hi = min(ys) - 0.2, max(ys) + 0.2

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (width - left - right) * x / x_max
        py = top + (height - top - bottom) * (1 - (y - y_lo) / (y_hi - y_lo))
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        y = y_lo + (y_hi - y_lo) * i / 5
        draw.text((8, at(0, y)[1] - 6), f"{y:.2f}", fill="black")
        draw.line([at(0, y), (width - right, at(0, y)[1])], fill=(225, 225, 225))
    for x in sorted(set(xs)):
        draw.text((at(x, y_lo)[0] - 6, height - bottom + 6), str(x), fill="black")
    draw.text((left + 120, height - 28), "labelled images (pool)", fill="black")
    title = payload.get("dataset_label", "GrabCut")
    draw.text((left, 12), f"NoC@90 on the held-out {title} test images (lower is better)", fill="black")
    base = payload["baseline"]["noc90"]
    draw.line([at(0, base), at(x_max, base)], fill=(120, 120, 120), width=1)
    target = base * 0.8
    draw.line([at(0, target), at(x_max, target)], fill=(200, 160, 160), width=1)
    # per order: its line, its seed-mean line, its single-seed lines
    shades = {
        "random": ((40, 90, 200), (20, 40, 120), (150, 170, 230)),
        "active": ((220, 80, 30), (150, 50, 10), (240, 180, 150)),
        "weighted": ((60, 160, 60), (20, 100, 20), (150, 210, 150)),
        "hybrid": ((150, 60, 170), (90, 20, 110), (200, 160, 215)),
        "diverse": ((20, 160, 170), (10, 100, 110), (150, 215, 220)),
        "auto": ((200, 40, 140), (130, 10, 90), (235, 160, 205)),
    }
    legend = [("untrained", (120, 120, 120)), ("-20 % target", (200, 160, 160))]
    for curve in curves:
        order = curve["label"].split(" ")[0]
        line, mean, seed = shades.get(order.removesuffix("-mean"), ((60, 160, 60),) * 3)
        colour = mean if order.endswith("-mean") else seed if " seed " in curve["label"] else line
        pts = [at(p["labelled"], p["noc90"]) for p in curve["points"]]
        draw.line(pts, fill=colour, width=3 if "seed" not in curve["label"] else 1)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend.append((curve["label"], colour))
        if all("candidate" in p for p in curve["points"][1:]) and len(curve["points"]) > 1:
            light = tuple((c + 255) // 2 for c in colour)
            pts = [at(curve["points"][0]["labelled"], curve["points"][0]["noc90"])]
            pts += [at(p["labelled"], p["candidate"]["noc90"]) for p in curve["points"][1:]]
            draw.line(pts, fill=light, width=1)
            legend.append((f"{curve['label']} candidates", light))
    for i, (label, colour) in enumerate(legend):
        y = top + 10 + 18 * i
        draw.line([(width - right + 12, y + 6), (width - right + 36, y + 6)], fill=colour, width=3)
        draw.text((width - right + 42, y), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def mean_curve(curves: list[dict[str, Any]], label: str) -> dict[str, Any]:
    rounds = min(len(c["points"]) for c in curves)
    points = []
    for i in range(rounds):
        rows = [c["points"][i] for c in curves]
        points.append(
            {
                "round": rows[0]["round"],
                "labelled": rows[0]["labelled"],
                "noc90": float(np.mean([r["noc90"] for r in rows])),
                "miou_mean": float(np.mean([r["miou_mean"] for r in rows])),
            }
        )
    return {"label": label, "points": points}


def summarize(curves: list[dict[str, Any]], orders: list[str]) -> dict[str, Any]:
    """Per order, per round: the seed-mean, min and max promoted test NoC@90, and the labelled images
    each order needed until its seed-mean reached random order's final seed-mean (None: never)."""
    table: dict[str, Any] = {}
    for order in orders:
        same = [c for c in curves if c.get("order") == order]
        if not same:
            continue
        rounds = min(len(c["points"]) for c in same)
        table[order] = {
            "seeds": [c["seed"] for c in same],
            "rounds": [
                {
                    "labelled": same[0]["points"][i]["labelled"],
                    "mean": float(np.mean([c["points"][i]["noc90"] for c in same])),
                    "min": float(min(c["points"][i]["noc90"] for c in same)),
                    "max": float(max(c["points"][i]["noc90"] for c in same)),
                }
                for i in range(rounds)
            ],
        }
    if "random" in table:
        target = table["random"]["rounds"][-1]["mean"]
        for row in table.values():
            reached = [r["labelled"] for r in row["rounds"] if r["mean"] <= target + 1e-9]
            row["labelled_to_reach_random_final"] = reached[0] if reached else None
        table["random_final_mean"] = target
    return table


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for order, row in summary.items():
        if not isinstance(row, dict):
            continue
        cells = ", ".join(
            f"{r['labelled']}: {r['mean']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" for r in row["rounds"]
        )
        reach = row.get("labelled_to_reach_random_final", "-")
        lines.append(f"{order} (seeds {row['seeds']}): {cells}; reaches random's final mean at {reach}")
    return "\n".join(lines)


def _one_thread() -> None:
    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        default="grabcut",
        help="grabcut, domain (the synthetic one-class project of seemly.bench.domain) or a dataset folder",
    )
    parser.add_argument(
        "--domain-images", type=int, default=90, help="images of the domain dataset (pool + test)"
    )
    parser.add_argument(
        "--image",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the refiner see the RGB planes (default: on for domain, off otherwise)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--batch", type=int, default=6, help="images labelled per round (one joins the gate set)"
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=None,
        help="labelling pool size, the rest are test images (30; domain: 60)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="runs per order (seeds 0..N-1: order draw, simulation, fit)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first-seed .. first-seed+N-1 (more seeds in a later run)",
    )
    parser.add_argument("--orders", default="random,active", help=f"comma-separated: {', '.join(ORDERS)}")
    parser.add_argument("--sessions", type=int, default=3, help="simulated sessions per labelled image")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=120, help="training steps per round")
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--test-limit", type=int, default=None, help="only the first N test images")
    parser.add_argument(
        "--gate-min-gain", type=float, default=0.01, help="NoC@90 clicks a candidate must save"
    )
    parser.add_argument("--lr", type=float, default=FitConfig().lr, help="peak learning rate of a round")
    parser.add_argument(
        "--eval-candidates",
        action="store_true",
        help="also measure each round's candidate on the test images",
    )
    parser.add_argument(
        "--gate-per-batch",
        type=int,
        default=1,
        help="images of each batch that join the gate set (the last ones)",
    )
    parser.add_argument("--workers", type=int, default=1, help="curves computed side by side (processes)")
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds x 4 images, 10 test images, short fits"
    )
    parser.add_argument("--json", type=Path, default=Path("learning_curve.json"))
    parser.add_argument("--png", type=Path, default=Path("learning_curve.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batch, args.max_steps, args.sessions = 2, 4, 30, 1
    if not 1 <= args.gate_per_batch < args.batch:
        parser.error("--gate-per-batch must be at least 1 and below --batch (the rest are training examples)")
    _one_thread()  # measured faster than 2 threads on a shared 2-core machine
    dataset = open_dataset(args.dataset, args.domain_images)
    if args.pool is None:
        args.pool = 60 if args.dataset == "domain" else 30
    pool_stems, test_stems = split(dataset.stems, args.pool)
    if args.quick:
        test_stems = test_stems[:10]
    if args.test_limit is not None:
        test_stems = test_stems[: args.test_limit]
    test = [dataset.load(stem) for stem in test_stems]
    see_image = args.image if args.image is not None else args.dataset == "domain"
    refiner_config = RefinerConfig(image=see_image)
    fit_config = FitConfig(
        epochs=args.epochs,
        min_steps=args.max_steps,
        lr=args.lr,
        max_steps=args.max_steps,
        threads=1,
        refiner=refiner_config,
    )
    policy = GatePolicy(noc_margin=0.0, min_noc_gain=args.gate_min_gain, miou_tolerance=0.01)
    started = time.perf_counter()
    baseline = evaluate_engine(ClassicEngine(), test, max_clicks=args.max_clicks)
    print(f"untrained engine: test NoC@90 {baseline.noc90:.2f}, mIoU {baseline.miou_mean:.3f}", flush=True)
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    for order in orders:
        if order not in ORDERS:
            parser.error(f"unknown order {order!r}: use {', '.join(ORDERS)}")
    # seed-major, so that the curves done first are seed-matched across orders
    jobs = [
        (order, seed) for seed in range(args.first_seed, args.first_seed + args.seeds) for order in orders
    ]  # active too: the seed varies training
    common = {
        "rounds": args.rounds,
        "batch": args.batch,
        "fit_config": fit_config,
        "refiner_config": refiner_config,
        "policy": policy,
        "sessions": args.sessions,
        "max_clicks": args.max_clicks,
        "baseline": baseline,
        "eval_candidates": args.eval_candidates,
        "gate_per_batch": args.gate_per_batch,
    }
    if args.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")  # no fork after torch started its threads
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_one_thread) as pool:
            futures = [
                pool.submit(run_curve, dataset, pool_stems, test, order=o, seed=s, **common) for o, s in jobs
            ]
            partial = args.json.with_suffix(".partial.json")
            for _done in as_completed(futures):  # each finished curve, in case the run is cut short
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps([f.result() for f in futures if f.done()], indent=1))
            partial.unlink(missing_ok=True)
            curves = [f.result() for f in futures]
    else:
        curves = [run_curve(dataset, pool_stems, test, order=o, seed=s, **common) for o, s in jobs]
    for curve in curves:
        multi = args.seeds > 1
        curve["label"] = f"{curve['order']} seed {curve['seed']}" if multi else curve["order"]
    for order in orders:
        same = [c for c in curves if c.get("order") == order]
        if len(same) > 1:
            curves.append(mean_curve(same, f"{order}-mean"))
    payload = {
        "machine": machine_description(),
        "dataset": str(dataset.root),
        "dataset_label": "synthetic domain" if args.dataset == "domain" else dataset.name,
        "pool": pool_stems,
        "test": test_stems,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "refiner": refiner_config.model_dump(mode="json"),
        "fit": fit_config.model_dump(mode="json", exclude={"refiner"}),
        "gate": policy.model_dump(mode="json"),
        "baseline": baseline.to_dict(rows=True),
        "curves": curves,
        "summary": summarize(curves, orders),
        "seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1))
    plot(payload, args.png)
    print(format_summary(payload["summary"]), flush=True)
    print(f"done in {payload['seconds']:.0f} s: {args.json}, {args.png}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The classic branch of ``seemly train run``: the refiner learns from the served engine's mistakes.

Click sessions of the served engine are simulated on the training pairs (in the driver); their
states become refiner examples (:mod:`seemly.learning.examples`), which Ray Train fits
(:func:`workers.train_ray.refiner_loop`), and the refiner is written whole to the job's artifact
folder. The candidate is the classic engine with that refiner, as Serve will load it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from seemly.config import Settings
from seemly.learning.artifacts import artifact_uri
from seemly.learning.data import TrainingData, TrainingPair
from seemly.learning.policy import TrainingPolicy
from workers.train_ray import REFINER_FILE, fit_on_ray, refiner_loop
from workers.train_slot import TrainingError

if TYPE_CHECKING:
    from workers.train import TrainOptions

log = logging.getLogger(__name__)


def simulate(
    engine: Any, pairs: Sequence[TrainingPair], options: TrainOptions
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Refiner examples from simulated sessions of ``engine`` on ``pairs``; a failing pair is reported."""
    from seemly.learning.examples import simulate_examples

    examples: list[Any] = []
    failed: list[dict[str, Any]] = []
    for index, pair in enumerate(pairs):
        rng = np.random.default_rng([options.seed, pair.image_id, index])
        try:
            examples += simulate_examples(
                engine,
                pair.image,
                pair.gt,
                rng=rng,
                max_clicks=options.sim_max_clicks,
                sessions=options.sim_sessions,
                source=f"{pair.sha256[:12]}:{pair.key}",
            )
        except Exception as exc:  # one bad pair never fails the run
            log.warning("training: simulating image %s region %s failed: %s", pair.image_id, pair.key, exc)
            failed.append(
                {"image_id": pair.image_id, "region": pair.key, "error": f"{type(exc).__name__}: {exc}"[:500]}
            )
    return examples, failed


def train_refiner(
    current_engine: Any,
    data: TrainingData,
    policy: TrainingPolicy,
    settings: Settings,
    options: TrainOptions,
    artifacts: Any,
    errors: list[dict[str, Any]],
    seconds: dict[str, float],
    run_name: str,
    meta: dict[str, Any],
    project_name: str,
) -> tuple[str, dict[str, Any], int]:
    """Simulate the served engine's sessions, fit the refiner on Ray Train, write it; ``(uri, metrics, examples)``."""
    from seemly.learning.refiner import LearnedRefiner

    clock = time.perf_counter()
    examples, failed = simulate(current_engine, data.train, options)
    errors += failed
    seconds["simulate"] = time.perf_counter() - clock
    if not examples:
        raise TrainingError(
            f"project {project_name}: no training example could be simulated from {len(data.train)} regions "
            f"({len(failed)} failed{', e.g. ' + failed[0]['error'] if failed else ''})"
        )

    clock = time.perf_counter()
    init = getattr(current_engine, "refiner", None)
    fit = {
        "epochs": policy.epochs,
        "seed": options.seed,
        "refiner": {"image": policy.refiner_sees_image},
        **options.fit,
    }
    refiner_bytes, train_metrics = fit_on_ray(
        refiner_loop,
        {"fit": fit, "init": init.to_bytes() if isinstance(init, LearnedRefiner) else None},
        REFINER_FILE,
        settings,
        objects={"examples": list(examples)},
        num_workers=options.num_workers,
        use_gpu=options.use_gpu,
        name=run_name,
    )
    seconds["fit"] = time.perf_counter() - clock

    refiner = LearnedRefiner.from_bytes(refiner_bytes, source=f"job {meta['job_id']} checkpoint")
    refiner.meta.update(meta)
    uri = artifact_uri(settings, meta["project_id"], meta["job_id"], REFINER_FILE)
    refiner.save(uri, artifacts)
    return uri, train_metrics, len(examples)

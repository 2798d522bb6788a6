"""The SAM branch of ``seemly train run``: which SAM a project is served with, and fine-tuning its decoder.

A project is trained as the engine it is served with: its promoted version's engine, or, with none
promoted, its policy's ``base_engine`` (``projects.settings["training"]``, default ``SEEMLY_ENGINE``).
For ``sam`` the run ships the training images (in SAM's input frame) to Ray Train, where
:func:`workers.train_ray.sam_decoder_loop` fine-tunes the mask decoder; the driver then writes the
whole fine-tuned checkpoint (:mod:`seemly.learning.sam_artifact`) to the job's artifact folder, and
the candidate is that checkpoint loaded exactly as Serve will load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seemly.config import Settings
from seemly.learning import versions
from seemly.learning.artifacts import artifact_uri
from seemly.learning.data import TrainingPair
from seemly.learning.policy import TrainingPolicy
from seemly.storage import Storage, display_uri
from workers.train_slot import TrainingError

SAM_FILE = "sam.pth"
TRAINABLE = ("classic", "sam")


def served_engine(
    current: versions.VersionInfo | None, policy: TrainingPolicy, settings: Settings
) -> tuple[str, dict[str, Any]]:
    """``(engine name, create_engine options)`` of what the project is served with now."""
    if current is None:
        if policy.base_engine == "sam":
            return "sam", {"checkpoint": policy.base_checkpoint}
        return "classic", {}
    name, options = versions.engine_spec(current)
    if name not in TRAINABLE:
        raise TrainingError(
            f"the promoted version {current.name} is a {name!r} model; training fine-tunes the classic "
            "engine's refiner and SAM's mask decoder only (promote a classic or sam version, or roll back)"
        )
    if name == "sam" and not options.get("checkpoint"):
        fallback = policy.base_checkpoint or settings.engine_checkpoint
        if not fallback:
            raise TrainingError(
                f"the promoted version {current.name} is the base sam engine but no checkpoint is "
                "configured: set training.base_checkpoint or SEEMLY_ENGINE_CHECKPOINT"
            )
        options["checkpoint"] = fallback
    return name, options


def sam_engine(checkpoint: str, storage: Storage, settings: Settings) -> Any:
    """A SAM engine on ``checkpoint`` with the run's settings (device, storage, checkpoint cache)."""
    from seemly.engines.base import EngineError, create_engine

    try:
        return create_engine(
            "sam",
            checkpoint=checkpoint,
            storage=storage,
            device=settings.device,
            cache_dir=Path(settings.home).expanduser() / "cache" / "checkpoints",
        )
    except EngineError as exc:
        raise TrainingError(f"cannot load the SAM checkpoint {display_uri(checkpoint)}: {exc}") from None


def train_sam(
    engine: Any,
    checkpoint: str,
    pairs: list[TrainingPair],
    policy: TrainingPolicy,
    settings: Settings,
    artifacts: Storage,
    *,
    fit: dict[str, Any],
    num_workers: int | None,
    use_gpu: bool | None,
    name: str,
    meta: dict[str, Any],
    project_id: int,
    job_id: int,
) -> tuple[str, dict[str, Any], int]:
    """Fine-tune ``engine``'s decoder on Ray Train from ``pairs``; ``(artifact uri, train metrics, regions)``."""
    from seemly.learning.sam_artifact import SamArtifactError, decoder_from_bytes, save_fine_tuned
    from seemly.learning.sam_decoder import DecoderFitConfig, prepare_images
    from workers.train_ray import DECODER_FILE, fit_on_ray, sam_decoder_loop

    try:
        DecoderFitConfig(**fit)
    except ValueError as exc:
        raise TrainingError(f"bad SAM fine-tuning options {fit}: {exc}") from None
    images = prepare_images(pairs, int(engine.model.image_encoder.img_size))
    regions = sum(len(image.masks) for image in images)
    if not images:
        raise TrainingError(f"no training region of {len(pairs)} survived resizing to SAM's input frame")
    data, metrics = fit_on_ray(
        sam_decoder_loop,
        {"fit": fit, "checkpoint": checkpoint, "regions": regions},
        DECODER_FILE,
        settings,
        objects={"images": images, "storage": artifacts},
        num_workers=num_workers,
        use_gpu=use_gpu,
        name=name,
    )
    uri = artifact_uri(settings, project_id, job_id, SAM_FILE)
    try:
        decoder = decoder_from_bytes(data, source=f"job {job_id} checkpoint")
        save_fine_tuned(
            uri,
            artifacts,
            engine.model.state_dict(),
            decoder,
            {**meta, "base_checkpoint": display_uri(checkpoint), "steps": metrics.get("steps")},
        )
    except SamArtifactError as exc:
        raise TrainingError(str(exc)) from None
    return uri, metrics, regions

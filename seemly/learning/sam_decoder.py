"""Fine-tuning SAM's mask decoder from a project's ground truth, with prompts simulated as SAM was trained.

What trains: ``mask_decoder`` only (~4 M parameters for every official SAM: the decoder does not
grow with the encoder). The image encoder and the prompt encoder stay frozen, so each image is
encoded once, under ``no_grad``, and its embedding is reused by every prompt of every step: a step
costs a few decoder passes, never an encoder pass.

A step takes ``batch`` images; on each, ``sessions`` of its regions are simulated side by side on
its one embedding (the decoder batches prompts of one image): a first prompt (a jittered deep click
with SAM's three candidates, or a jittered box with one output), then ``rounds - 1`` correction
clicks placed by the benchmark's click simulator on the previous prediction, with the previous
round's low-resolution logits as the mask input (detached: SAM does not back-propagate through
rounds). The prediction a round passes on is the candidate with the highest predicted IoU, as the
engine serves. Loss per round: :func:`seemly.learning.sam_losses.sam_loss`.

Images travel in SAM's input frame (:mod:`seemly.learning.sam_images`), so prompts need no
coordinate transform and a large photo costs no more than the model's input. Deterministic given
the seed (and the rank).

No Ray here: ``workers.train_ray`` runs :func:`fit_decoder` in a Ray Train worker, the same way
:func:`seemly.learning.fit.fit_refiner` runs there, with ``prepare_model`` and a ``report`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from seemly.learning.sam_images import DecoderImage, EmbeddedImage, embed_images, prepare_images
from seemly.learning.sam_losses import sam_loss
from seemly.learning.sam_prompts import SimSession, add_click, point_batch, start_session

if TYPE_CHECKING:
    from seemly.engines.sam import SamEngine

__all__ = [
    "DecoderFit",
    "DecoderFitConfig",
    "DecoderImage",
    "evaluate_decoder",
    "fit_decoder",
    "prepare_images",
    "run_sessions",
]

DecoderState = dict[str, torch.Tensor]
Report = Callable[[dict[str, Any], DecoderState], None]


class DecoderFitConfig(BaseModel):
    """Hyper-parameters of one decoder fine-tuning round (SAM's prompt simulation and loss weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=6, ge=1, le=1000, description="passes over the regions")
    min_steps: int = Field(default=0, ge=0, description="at least this many steps")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps in all")
    batch: int = Field(default=4, ge=1, le=256, description="images per step")
    sessions: int = Field(default=2, ge=1, le=64, description="prompt sessions per image and step")
    rounds: int = Field(default=5, ge=1, le=32, description="first prompt + correction clicks per session")
    box_share: float = Field(default=0.5, ge=0.0, le=1.0, description="sessions that start with a box")
    click_jitter: float = Field(default=0.3, ge=0.0, lt=1.0, description="noise on the clicks' depth maps")
    box_noise: float = Field(default=0.1, ge=0.0, le=1.0, description="box noise std, share of its side")
    box_noise_max: float = Field(default=20.0, ge=0.0, description="largest box corner move (pixels)")
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    focal_weight: float = Field(default=20.0, ge=0.0)
    dice_weight: float = Field(default=1.0, ge=0.0)
    iou_weight: float = Field(default=1.0, ge=0.0, description="IoU-head MSE weight")
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, le=256, description="torch CPU threads (None: as is)")


@dataclass
class DecoderFit:
    state: DecoderState  # the fine-tuned mask_decoder's state dict (CPU)
    metrics: dict[str, Any]


Sync = Callable[[bool], AbstractContextManager[Any]]


def run_sessions(
    model: Any,
    net: torch.nn.Module,
    item: EmbeddedImage,
    regions: Sequence[int],
    use_box: bool,
    rng: np.random.Generator,
    config: DecoderFitConfig,
    scale: float = 0.0,
    sync: Sync | None = None,
    last: bool = True,
) -> tuple[float, list[float]]:
    """Simulate ``regions``' sessions on one image; ``scale > 0`` back-propagates ``scale`` x each
    round's loss. Returns (mean loss over rounds, IoU of the served candidate after each round)."""
    device = item.features.device
    height, width = item.gts[0].shape
    sessions: list[SimSession] = [
        start_session(
            r,
            item.gts[r],
            use_box,
            rng,
            jitter=config.click_jitter,
            box_noise=config.box_noise,
            box_noise_max=config.box_noise_max,
        )
        for r in regions
    ]
    target = item.targets[list(regions)]
    with torch.no_grad():
        image_pe = model.prompt_encoder.get_dense_pe()
    mask_input: torch.Tensor | None = None
    losses: list[float] = []
    ious: list[float] = []
    for round_index in range(config.rounds):
        if mask_input is not None:
            with torch.no_grad():
                up = model.postprocess_masks(mask_input, (height, width), (height, width))
            preds = (up[:, 0] > model.mask_threshold).cpu().numpy()
            for session, pred in zip(sessions, preds, strict=True):
                add_click(session, item.gts[session.region], pred, config.click_jitter, rng)
        coords, labels, boxes = point_batch(sessions, height, width)
        with torch.no_grad():
            points = None
            if coords is not None and labels is not None:
                points = (torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device))
            box_t = torch.from_numpy(boxes).to(device) if boxes is not None else None
            sparse, dense = model.prompt_encoder(points=points, boxes=box_t, masks=mask_input)
        multimask = round_index == 0 and not use_box
        final = last and round_index == config.rounds - 1
        context = sync(final) if (scale > 0 and sync is not None) else nullcontext()
        with context:
            logits, iou_pred = net(
                image_embeddings=item.features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            loss, actual = sam_loss(
                logits,
                iou_pred,
                target,
                item.valid,
                focal_weight=config.focal_weight,
                dice_weight=config.dice_weight,
                iou_weight=config.iou_weight,
            )
            if scale > 0:
                (loss * scale).backward()
        served = iou_pred.detach().argmax(dim=1)
        rows = torch.arange(len(sessions), device=device)
        mask_input = logits.detach()[rows, served][:, None]
        losses.append(float(loss.detach()))
        ious.append(float(actual[rows, served].mean()))
    return float(np.mean(losses)), ious


@contextmanager
def _decoder_training(engine: SamEngine, threads: int | None) -> Iterator[torch.nn.Module]:
    """The engine's decoder with gradients on (everything else frozen); restored afterwards."""
    decoder = engine.model.mask_decoder
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for parameter in decoder.parameters():
            parameter.requires_grad_(True)
        decoder.train()
        yield decoder
    finally:
        decoder.eval()
        for parameter in decoder.parameters():
            parameter.requires_grad_(False)
        torch.set_num_threads(previous_threads)


def plan_steps(regions: int, config: DecoderFitConfig) -> tuple[int, int]:
    """``(steps per epoch, total steps)`` for ``regions`` regions per worker."""
    per_epoch = max(1, -(-max(1, regions) // (config.batch * config.sessions)))
    total = max(per_epoch * config.epochs, config.min_steps)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return per_epoch, total


def _pick(item: EmbeddedImage, count: int, rng: np.random.Generator) -> list[int]:
    regions = len(item.gts)
    if count <= regions:
        return sorted(int(i) for i in rng.choice(regions, size=count, replace=False))
    return [int(i) for i in rng.integers(0, regions, size=count)]


def fit_decoder(
    engine: SamEngine,
    images: Sequence[DecoderImage],
    config: DecoderFitConfig | None = None,
    *,
    regions_per_worker: int | None = None,
    rank: int = 0,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    report: Report | None = None,
) -> DecoderFit:
    """Fine-tune ``engine.model.mask_decoder`` in place on ``images``; deterministic per seed and rank.

    ``regions_per_worker`` (default: the regions of ``images``) sets the steps per epoch; with
    several Ray Train workers every one must take the same number of steps, so the caller passes the
    same value to all."""
    config = config or DecoderFitConfig()
    if not images:
        raise ValueError("no training images: label some images first")
    rng = np.random.default_rng([config.seed, rank])
    regions = regions_per_worker or sum(len(i.masks) for i in images)
    per_epoch, total = plan_steps(regions, config)
    with _decoder_training(engine, config.threads) as decoder:
        embedded = embed_images(engine, images)
        net = prepare_model(decoder) if prepare_model is not None else decoder
        no_sync = getattr(net, "no_sync", None)

        def sync(final: bool) -> AbstractContextManager[Any]:
            return no_sync() if (no_sync is not None and not final) else nullcontext()

        optimizer = torch.optim.AdamW(
            [p for p in decoder.parameters()], lr=config.lr, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.1
        )
        scale = 1.0 / (config.batch * config.rounds)
        started = time.perf_counter()
        losses: list[float] = []
        ious: list[float] = []
        metrics: dict[str, Any] = {}
        for step in range(total):
            optimizer.zero_grad(set_to_none=True)
            for index in range(config.batch):
                item = embedded[int(rng.integers(len(embedded)))]
                use_box = bool(rng.random() < config.box_share)
                loss, round_ious = run_sessions(
                    engine.model,
                    net,
                    item,
                    _pick(item, config.sessions, rng),
                    use_box,
                    rng,
                    config,
                    scale=scale,
                    sync=sync,
                    last=index == config.batch - 1,
                )
                losses.append(loss)
                ious.append(float(np.mean(round_ious)))
            optimizer.step()
            scheduler.step()
            if (step + 1) % per_epoch == 0 or step + 1 == total:
                metrics = {
                    "epoch": -(-(step + 1) // per_epoch),
                    "steps": step + 1,
                    "loss": float(np.mean(losses)),
                    "iou": float(np.mean(ious)),
                    "images": len(embedded),
                    "regions": regions,
                    "seconds": time.perf_counter() - started,
                }
                losses, ious = [], []
                if report is not None:
                    report(dict(metrics), _snapshot(decoder))
    return DecoderFit(_snapshot(decoder), metrics)


def _snapshot(decoder: torch.nn.Module) -> DecoderState:
    return {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}


def evaluate_decoder(
    engine: SamEngine, images: Sequence[DecoderImage], config: DecoderFitConfig | None = None
) -> dict[str, Any]:
    """Loss and served-candidate IoU per round of every region's click and box session (no training),
    with the config's prompt simulation and seed: what :func:`fit_decoder` is measured with."""
    config = config or DecoderFitConfig()
    rng = np.random.default_rng([config.seed, 1 << 20])
    losses: list[float] = []
    per_round: list[list[float]] = []
    with torch.no_grad():
        for item in embed_images(engine, images):
            for use_box in (False, True):
                loss, ious = run_sessions(
                    engine.model, engine.model.mask_decoder, item, range(len(item.gts)), use_box, rng, config
                )
                losses.append(loss)
                per_round.append(ious)
    rounds = np.asarray(per_round).mean(axis=0)
    return {"loss": float(np.mean(losses)), "iou": [float(v) for v in rounds], "sessions": len(per_round)}

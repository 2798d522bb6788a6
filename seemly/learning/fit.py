"""Fitting the refiner: a plain, deterministic torch loop over simulated examples.

No Ray here: ``workers.train`` runs :func:`fit_refiner` inside a Ray Train worker and passes
``prepare_model=ray.train.torch.prepare_model`` and a ``report`` callback that turns each epoch's
metrics into ``ray.train.report`` with a checkpoint. Loss: BCE against the soft target (the share
of object pixels in each working pixel) plus a soft-IoU term, which weighs a small object's errors
as much as a large one's, as NoC@90 does. Augmentation: flips, 90-degree turns and a small colour
jitter of the RGB planes, all drawn from the seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from seemly.learning.examples import RefineExample
from seemly.learning.refiner import LearnedRefiner, RefineNet, RefinerConfig

Report = Callable[[dict[str, Any], LearnedRefiner], None]


class FitConfig(BaseModel):
    """Training hyper-parameters of one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=6, ge=1, le=1000)
    min_steps: int = Field(
        default=100,
        ge=0,
        description="at least this many steps (more epochs over a small set: the zero-initialised "
        "correction needs ~100 steps before it changes any pixel)",
    )
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps in all")
    batch: int = Field(default=16, ge=1, le=1024)
    lr: float = Field(default=2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    iou_weight: float = Field(default=0.5, ge=0.0, le=10.0, description="soft-IoU loss weight beside BCE")
    flips: bool = True
    colour_jitter: float = Field(default=0.08, ge=0.0, le=0.5, description="max RGB gain/offset change")
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, le=256, description="torch CPU threads (None: as is)")
    refiner: RefinerConfig = Field(
        default_factory=RefinerConfig, description="architecture when from scratch"
    )


def _augment(planes: torch.Tensor, target: torch.Tensor, config: FitConfig, gen: torch.Generator) -> tuple:
    if config.flips:
        if torch.rand((), generator=gen) < 0.5:
            planes, target = planes.flip(-1), target.flip(-1)
        turns = int(torch.randint(0, 4, (), generator=gen))
        if turns:
            planes, target = planes.rot90(turns, (-2, -1)), target.rot90(turns, (-2, -1))
    if config.colour_jitter > 0:
        n = planes.shape[0]
        j = config.colour_jitter
        gain = 1.0 + (torch.rand((n, 3, 1, 1), generator=gen) * 2 - 1) * j
        offset = (torch.rand((n, 3, 1, 1), generator=gen) * 2 - 1) * j
        rgb = (planes[:, :3] * gain + offset).clamp(0.0, 1.0)
        planes = torch.cat([rgb, planes[:, 3:]], dim=1)
    return planes, target


def refine_loss(logits: torch.Tensor, target: torch.Tensor, iou_weight: float) -> torch.Tensor:
    """BCE (soft targets) + ``iou_weight`` x (1 - soft IoU) per example, averaged."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if iou_weight <= 0:
        return bce
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    union = (prob + target - prob * target).sum(dim=(1, 2, 3)).clamp_min(1e-6)
    return bce + iou_weight * (1.0 - inter / union).mean()


def _stack(examples: Sequence[RefineExample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    bad = [i for i, e in enumerate(examples) if e.size != size or e.planes.shape[-1] != size]
    if bad:
        raise ValueError(
            f"{len(bad)} examples were cropped at another size than the refiner's {size} "
            f"(first: #{bad[0]}, size {examples[bad[0]].size}); simulate them with this refiner config"
        )
    planes = torch.from_numpy(np.stack([e.planes for e in examples]))
    target = torch.from_numpy(np.stack([e.target for e in examples]))[:, None]
    return planes, target


def fit_refiner(
    train_examples: Sequence[RefineExample],
    config: FitConfig | None = None,
    *,
    init: LearnedRefiner | None = None,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    report: Report | None = None,
) -> LearnedRefiner:
    """Train a refiner on ``train_examples`` (from ``init``'s weights when given); deterministic per seed."""
    config = config or FitConfig()
    if not train_examples:
        raise ValueError("no training examples: label some images first")
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if init is not None:
                model = RefineNet(init.config)
                model.load_state_dict(init.model.state_dict())
            else:
                model = RefineNet(config.refiner)
            return _train(model, train_examples, config, prepare_model, report, init)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    model: RefineNet,
    examples: Sequence[RefineExample],
    config: FitConfig,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None,
    report: Report | None,
    init: LearnedRefiner | None,
) -> LearnedRefiner:
    arch = model.config
    planes_u8, target_u8 = _stack(examples, arch.size)
    net: torch.nn.Module = prepare_model(model) if prepare_model is not None else model
    device = next(net.parameters()).device
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = planes_u8.shape[0]
    steps_per_epoch = max(1, -(-n // config.batch))
    total_steps = max(steps_per_epoch * config.epochs, config.min_steps)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = -(-total_steps // steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(config.seed)
    step = 0
    started = time.perf_counter()
    meta: dict[str, Any] = dict(init.meta) if init is not None else {}
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        losses: list[float] = []
        for start in range(0, n, config.batch):
            if step >= total_steps:
                break
            index = order[start : start + config.batch]
            planes = planes_u8[index].float() / 255.0
            target = target_u8[index].float() / 255.0
            planes, target = _augment(planes, target, config, gen)
            logits = net(planes.to(device))
            loss = refine_loss(logits, target.to(device), config.iou_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
        metrics = {
            "epoch": epoch + 1,
            "steps": step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "examples": n,
            "seconds": time.perf_counter() - started,
        }
        if report is not None:
            report(metrics, _snapshot(model, meta, metrics))
        if step >= total_steps:
            break
    model.eval()
    meta.update(
        {
            "examples": int(meta.get("examples", 0)) + n,
            "steps": int(meta.get("steps", 0)) + step,
            "seed": config.seed,
        }
    )
    return LearnedRefiner(_unwrap(model), meta=meta)


def _unwrap(model: torch.nn.Module) -> RefineNet:
    inner = getattr(model, "module", model)
    assert isinstance(inner, RefineNet)
    return inner


def _snapshot(model: RefineNet, meta: dict[str, Any], metrics: dict[str, Any]) -> LearnedRefiner:
    """A copy of the model as it is now (the training goes on with the original)."""
    copy = RefineNet(model.config)
    copy.load_state_dict({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return LearnedRefiner(copy, meta={**meta, "epoch": metrics["epoch"]})


def evaluate_loss(
    refiner: LearnedRefiner, examples: Sequence[RefineExample], iou_weight: float = 0.5
) -> float:
    """Mean loss of ``refiner`` on ``examples`` (no augmentation), for tests and gates."""
    planes, target = _stack(examples, refiner.config.size)
    losses = []
    with torch.inference_mode():
        for start in range(0, planes.shape[0], 64):
            logits = refiner.model(planes[start : start + 64].float().to(refiner.device) / 255.0)
            t = target[start : start + 64].float().to(refiner.device) / 255.0
            losses.append(float(refine_loss(logits, t, iou_weight)) * logits.shape[0])
    return sum(losses) / planes.shape[0]

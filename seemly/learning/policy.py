"""A project's learning-loop policy: when to train, what, and how strict the promotion gate is.

Stored per project as JSON in ``projects.settings["training"]`` (any subset of the fields below);
whatever a project leaves out comes from the ``SEEMLY_TRAIN_*`` settings. Validated strictly: an
unknown key or a bad value is an error naming the project and the field, never silently ignored,
because a typo in ``min_new_corrections`` would otherwise mean "never train".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from seemly.config import Settings
from seemly.learning.gate import GatePolicy

SETTINGS_KEY = "training"
TRAINABLE_ENGINES = ("classic", "sam")
"""Engines whose learned part ``seemly train run`` fine-tunes: classic's refiner, SAM's mask decoder."""


class PolicyError(ValueError):
    """A project's ``settings["training"]`` that does not validate; the message names the field."""


class TrainingPolicy(BaseModel):
    """When the scheduler trains a project, and what the gate asks of a candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="the scheduler trains this project at all")
    min_new_corrections: int = Field(ge=1, description="train after this many new corrections")
    interval_s: float = Field(gt=0, description="train this long after the last run, if new data came")
    gate_noc_margin: float = Field(ge=-1, le=1, description="required NoC@90 drop, share of current")
    gate_miou_tolerance: float = Field(ge=0, le=1, description="allowed mIoU drop")
    gate_min_images: int = Field(ge=1, description="promote only on at least this many held-out images")
    held_out_share: float = Field(gt=0, lt=1, description="share of images held out for the gate")
    max_images: int = Field(ge=2, description="learn from at most the newest N images")
    epochs: int = Field(ge=1, le=1000, description="epochs of one fine-tuning round")
    refiner_sees_image: bool = Field(
        default=True,
        description="the refiner learns from the image's colours too (what makes a one-kind-of-object "
        "project learnable; on a mixed collection it overfits, and the gate refuses the candidate)",
    )
    base_engine: Literal["classic", "sam"] = Field(
        default="classic",
        description="what the project is served with while no version is promoted, and so what trains: "
        "classic (its refiner) or sam (its mask decoder); default SEEMLY_ENGINE. A promoted version's "
        "engine always wins.",
    )
    base_checkpoint: str | None = Field(
        default=None,
        description="the SAM weights a sam project starts from (a path, file:// or s3:// URI); default "
        "SEEMLY_ENGINE_CHECKPOINT when SEEMLY_ENGINE is sam",
        validate_default=True,
    )

    @field_validator("base_engine", mode="before")
    @classmethod
    def _trainable(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in TRAINABLE_ENGINES:
            raise ValueError(
                f"{value!r} cannot be fine-tuned: training fine-tunes classic (its refiner) or sam (its "
                "mask decoder); the default is SEEMLY_ENGINE, so set training.base_engine to one of them"
            )
        return value

    @field_validator("base_checkpoint")
    @classmethod
    def _sam_needs_weights(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = value.strip() or None if value is not None else None
        if info.data.get("base_engine") == "sam" and value is None:
            raise ValueError(
                "base_engine sam needs base_checkpoint: the SAM weights to fine-tune (a path, file:// or "
                "s3:// URI), or SEEMLY_ENGINE=sam with SEEMLY_ENGINE_CHECKPOINT"
            )
        return value

    @property
    def gate(self) -> GatePolicy:
        return GatePolicy(
            noc_margin=self.gate_noc_margin,
            miou_tolerance=self.gate_miou_tolerance,
            min_images=self.gate_min_images,
        )


def defaults(settings: Settings) -> dict[str, Any]:
    return {
        "min_new_corrections": settings.train_min_new_corrections,
        "interval_s": settings.train_interval_s,
        "gate_noc_margin": settings.train_gate_noc_margin,
        "gate_miou_tolerance": settings.train_gate_miou_tolerance,
        "gate_min_images": settings.train_gate_min_images,
        "held_out_share": settings.train_held_out_share,
        "max_images": settings.train_max_images,
        "epochs": settings.train_epochs,
        "base_engine": settings.engine,
        "base_checkpoint": settings.engine_checkpoint if settings.engine == "sam" else None,
    }


def policy_for(
    project_settings: dict[str, Any] | None, settings: Settings, project: str = ""
) -> TrainingPolicy:
    """The project's policy: its ``settings["training"]`` over the global defaults."""
    raw = (project_settings or {}).get(SETTINGS_KEY) or {}
    where = f"project {project}: " if project else ""
    if not isinstance(raw, dict):
        raise PolicyError(
            f'{where}settings["{SETTINGS_KEY}"] must be a JSON object, not {type(raw).__name__}'
        )
    try:
        return TrainingPolicy.model_validate({**defaults(settings), **raw})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'value'}: {error['msg']}" for error in exc.errors()
        )
        raise PolicyError(f'{where}settings["{SETTINGS_KEY}"] is invalid: {problems}') from None

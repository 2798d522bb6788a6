"""The promotion gate: does a freshly trained candidate deserve to replace the served version?

Pure and deterministic (no database, no model): the training run measures both versions on the
same held-out images and asks :func:`decide`. The rule is deliberately conservative, because a
promotion changes every annotator's masks at once:

* the candidate must need fewer clicks: held-out NoC@90 at least ``noc_margin`` (a share of the
  current NoC, e.g. 0.05 = 5 % fewer) below the current version's, and at least ``min_noc_gain``
  clicks fewer in absolute terms (so a tiny NoC cannot promote on noise);
* its mIoU may not fall more than ``miou_tolerance`` below the current one's;
* it may not fail (never reach 90 % IoU within the click budget) on more held-out images;
* the comparison must rest on at least ``min_images`` held-out images: on one or two images a
  candidate that costs clicks elsewhere passes by chance (the learning-curve benchmark saw one-image
  gates promote candidates that needed 2.5x the clicks on the test images).

The decision, its reason and the deltas are stored in ``model_versions.decision``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EvalMetrics(BaseModel):
    """What the gate compares: held-out NoC@90 (lower is better), mIoU and failures, on ``images``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    noc90: float = Field(ge=0)
    miou: float = Field(ge=0, le=1)
    failures: int = Field(default=0, ge=0)
    images: int = Field(default=0, ge=0)

    @classmethod
    def from_result(cls, result: Any) -> EvalMetrics:
        """From an evaluation result object (``noc90``, ``miou``, ``failures``, optional ``images``)."""
        failures = getattr(result, "failures", 0)
        if not isinstance(failures, int):  # a list of failed images
            failures = len(failures)
        images = getattr(result, "images", None)
        if images is None:
            images = getattr(result, "count", 0)
        if not isinstance(images, int):
            images = len(images)
        miou = getattr(result, "miou_mean", result.miou)  # EvalResult keeps mIoU per click count
        return cls(noc90=float(result.noc90), miou=float(miou), failures=failures, images=images)


class GatePolicy(BaseModel):
    """How much better a candidate must be; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noc_margin: float = Field(default=0.05, ge=-1, le=1)
    min_noc_gain: float = Field(default=0.0, ge=0)
    miou_tolerance: float = Field(default=0.01, ge=0, le=1)
    allow_more_failures: bool = False
    min_images: int = Field(default=1, ge=1)


class Decision(BaseModel):
    """The gate's verdict: promote or not, a one-line reason, and candidate-minus-current deltas."""

    model_config = ConfigDict(frozen=True)

    promote: bool
    reason: str
    deltas: dict[str, float]
    candidate: EvalMetrics
    current: EvalMetrics
    policy: GatePolicy

    def as_record(self) -> dict[str, Any]:
        """JSON for ``model_versions.decision``."""
        return self.model_dump(mode="json")


def decide(candidate: EvalMetrics, current: EvalMetrics, policy: GatePolicy | None = None) -> Decision:
    """Compare ``candidate`` with ``current`` (both measured on the same held-out images)."""
    policy = policy or GatePolicy()
    deltas = {
        "noc90": candidate.noc90 - current.noc90,
        "miou": candidate.miou - current.miou,
        "failures": float(candidate.failures - current.failures),
    }
    needed = max(policy.noc_margin * current.noc90, policy.min_noc_gain)
    gain = current.noc90 - candidate.noc90
    summary = f"NoC@90 {current.noc90:.2f} -> {candidate.noc90:.2f}, mIoU {current.miou:.3f} -> {candidate.miou:.3f}"
    problems: list[str] = []
    measured_on = min(candidate.images, current.images)
    if measured_on < policy.min_images:
        problems.append(
            f"measured on {measured_on} held-out images, fewer than the {policy.min_images} a promotion needs"
        )
    if gain < needed:
        problems.append(f"needs at least {needed:.2f} fewer clicks, got {gain:+.2f}")
    if deltas["miou"] < -policy.miou_tolerance:
        problems.append(f"mIoU fell by {-deltas['miou']:.3f} (tolerance {policy.miou_tolerance:.3f})")
    if deltas["failures"] > 0 and not policy.allow_more_failures:
        problems.append(f"{int(deltas['failures'])} more images never reach 90 % IoU")
    promote = not problems
    reason = f"{'promote' if promote else 'keep current'}: {summary}"
    if problems:
        reason += " (" + "; ".join(problems) + ")"
    return Decision(
        promote=promote,
        reason=reason,
        deltas=deltas,
        candidate=candidate,
        current=current,
        policy=policy,
    )

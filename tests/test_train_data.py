"""Training data from Postgres, the deterministic split, the gate and the per-project policy (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seemly.config import Settings
from seemly.db import models as db
from seemly.learning.data import (
    TrainingDataError,
    data_bounds,
    held_out_fraction,
    load_training_data,
    region_refs,
    split_images,
)
from seemly.learning.gate import EvalMetrics, GatePolicy, decide
from seemly.learning.policy import PolicyError, policy_for
from seemly.masks import Mask
from seemly.storage import Storage
from tests.train_support import add_correction, add_image, labelled_project, make_project, train_settings


def test_latest_region_wins_duplicates_count_once_and_upto_bounds(postgres_db, tmp_path: Path) -> None:
    project_id = make_project(postgres_db)
    image_id, (mask,) = add_image(postgres_db, tmp_path, 1)
    smaller = mask.copy()
    smaller[: mask.shape[0] // 2] = False
    first = add_correction(postgres_db, project_id, image_id, smaller, annotation=1, region="r1")
    # the same Label Studio region, in a later annotation of the task: replaces the first
    second = add_correction(postgres_db, project_id, image_id, mask, annotation=2, region="r1")
    # the same mask stored again as a human mask row: counted once
    m = Mask(mask)
    with postgres_db.begin() as conn:
        conn.execute(
            db.Mask.__table__.insert().values(
                project_id=project_id,
                image_id=image_id,
                source=db.MaskSource.ANNOTATION,
                label="blob",
                rle=m.to_coco_rle(),
                bbox=list(m.bbox),
                area=m.area,
                ls_annotation_id=2,
            )
        )
    corrections_upto, masks_upto = data_bounds(postgres_db, project_id)
    assert corrections_upto == second
    refs = region_refs(postgres_db, project_id, corrections_upto=corrections_upto, masks_upto=masks_upto)
    assert len(refs) == 1 and refs[0].row_id == second
    assert Mask.from_coco_rle(refs[0].rle) == Mask(mask)
    # up to the first correction only: reproducible, the later one is not seen
    refs = region_refs(postgres_db, project_id, corrections_upto=first, masks_upto=None)
    assert [r.row_id for r in refs] == [first]


def test_split_is_deterministic_by_sha_and_never_leaves_a_side_empty() -> None:
    shas = [f"{i:02x}" + "0" * 62 for i in range(0, 256, 8)]  # fractions spread over [0, 1)
    train, held = split_images(shas, 0.25)
    assert held == {s for s in shas if held_out_fraction(s) < 0.25}
    assert train | held == set(shas) and not train & held
    assert split_images(list(reversed(shas)), 0.25) == (train, held)  # order does not matter
    # a growing project never moves an image from one side to the other
    more = shas + [f"{i:02x}" + "1" * 62 for i in range(4, 256, 8)]
    train2, held2 = split_images(more, 0.25)
    assert train <= train2 and held <= held2
    # two images both above the share: the lowest is held out anyway; both below: one trains
    high = ["f0" + "0" * 62, "e0" + "0" * 62]
    assert split_images(high, 0.2) == ({"f0" + "0" * 62}, {"e0" + "0" * 62})
    low = ["01" + "0" * 62, "02" + "0" * 62]
    assert split_images(low, 0.5) == ({"02" + "0" * 62}, {"01" + "0" * 62})
    with pytest.raises(TrainingDataError, match="between 0 and 1"):
        split_images(shas, 1.0)


def test_load_splits_by_image_and_reports_an_unreadable_one(postgres_db, tmp_path: Path) -> None:
    project_id = labelled_project(postgres_db, tmp_path, images=5)
    (tmp_path / f"img-{1000 * project_id + 2}.png").unlink()  # one image gone from storage
    corrections_upto, masks_upto = data_bounds(postgres_db, project_id)
    data = load_training_data(
        postgres_db,
        project_id,
        Storage(file_roots=[tmp_path]),
        corrections_upto=corrections_upto,
        masks_upto=masks_upto,
        held_out_share=0.3,
    )
    assert data.images["train"] + data.images["held_out"] == 4 and data.images["held_out"] >= 1
    assert [f["error"] for f in data.failed] == ["cannot be read from any of its URIs"]
    assert not {p.sha256 for p in data.train} & {p.sha256 for p in data.held_out}
    for pair in data.train + data.held_out:
        assert pair.gt.shape == pair.image.shape[:2] and pair.gt.any()
    again = load_training_data(
        postgres_db,
        project_id,
        Storage(file_roots=[tmp_path]),
        corrections_upto=corrections_upto,
        masks_upto=masks_upto,
        held_out_share=0.3,
    )
    assert [p.key for p in again.held_out] == [p.key for p in data.held_out]


def test_too_little_data_is_a_clear_error(postgres_db, tmp_path: Path) -> None:
    project_id = labelled_project(postgres_db, tmp_path, images=1)
    bounds = data_bounds(postgres_db, project_id)
    with pytest.raises(
        TrainingDataError, match=r"p-train has 1 labelled region\(s\) on 1 image\(s\).*at least 2"
    ):
        load_training_data(
            postgres_db,
            project_id,
            Storage(file_roots=[tmp_path]),
            corrections_upto=bounds[0],
            masks_upto=bounds[1],
            project_name="p-train",
        )
    empty = make_project(postgres_db, "empty", None)
    with pytest.raises(TrainingDataError, match="0 labelled region"):
        load_training_data(
            postgres_db, empty, Storage(), corrections_upto=None, masks_upto=None, project_name="empty"
        )


# --- the gate ---------------------------------------------------------------------------------------------


def m(noc90: float, miou: float, failures: int = 0) -> EvalMetrics:
    return EvalMetrics(noc90=noc90, miou=miou, failures=failures, images=10)


def test_gate_accepts_a_clearly_better_candidate() -> None:
    decision = decide(m(3.0, 0.90), m(4.0, 0.89), GatePolicy(noc_margin=0.1, miou_tolerance=0.01))
    assert decision.promote
    assert decision.deltas["noc90"] == pytest.approx(-1.0) and decision.deltas["miou"] == pytest.approx(0.01)
    assert decision.reason.startswith("promote: NoC@90 4.00 -> 3.00")
    assert decision.as_record()["candidate"]["noc90"] == 3.0


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        (m(3.9, 0.90), "needs at least 0.40 fewer clicks, got +0.10"),  # better, but within the margin
        (m(5.0, 0.90), "needs at least 0.40 fewer clicks, got -1.00"),  # worse
        (m(3.0, 0.80), "mIoU fell by 0.090"),  # fewer clicks bought with worse masks
        (m(3.0, 0.90, failures=2), "2 more images never reach 90 % IoU"),
    ],
)
def test_gate_refuses_a_worse_or_not_better_enough_candidate(candidate: EvalMetrics, why: str) -> None:
    decision = decide(candidate, m(4.0, 0.89, failures=0), GatePolicy(noc_margin=0.1, miou_tolerance=0.01))
    assert not decision.promote
    assert decision.reason.startswith("keep current:") and why in decision.reason


def test_gate_refuses_to_promote_on_too_few_held_out_images() -> None:
    policy = GatePolicy(noc_margin=0.1, miou_tolerance=0.01, min_images=3)
    better = EvalMetrics(noc90=2.0, miou=0.95, images=2)
    decision = decide(better, EvalMetrics(noc90=4.0, miou=0.85, images=2), policy)
    assert not decision.promote
    assert "measured on 2 held-out images, fewer than the 3 a promotion needs" in decision.reason
    enough = decide(
        better.model_copy(update={"images": 3}), m(4.0, 0.85).model_copy(update={"images": 3}), policy
    )
    assert enough.promote
    settings = Settings(database_url="sqlite://")
    assert policy_for({}, settings).gate.min_images == 3  # SEEMLY_TRAIN_GATE_MIN_IMAGES
    assert policy_for({"training": {"gate_min_images": 1}}, settings).gate.min_images == 1
    with pytest.raises(PolicyError, match="gate_min_images"):
        policy_for({"training": {"gate_min_images": 0}}, settings)


def test_gate_from_an_evaluation_result_uses_mean_miou() -> None:
    from seemly.learning.evaluate import EvalResult

    result = EvalResult(
        images=4, max_clicks=20, noc90=2.5, noc85=2.0, miou={1: 0.7, 3: 0.8, 5: 0.9}, failures=1
    )
    metrics = EvalMetrics.from_result(result)
    assert (metrics.noc90, metrics.failures, metrics.images) == (2.5, 1, 4)
    assert metrics.miou == pytest.approx(0.8)


# --- the policy -------------------------------------------------------------------------------------------


def test_policy_defaults_overrides_and_clear_errors(tmp_path: Path) -> None:
    settings = train_settings("sqlite://", tmp_path, train_min_new_corrections=7)
    policy = policy_for({}, settings)
    assert policy.enabled and policy.min_new_corrections == 7 and policy.epochs == 1
    policy = policy_for({"training": {"min_new_corrections": 3, "gate_noc_margin": 0.2}}, settings)
    assert policy.min_new_corrections == 3 and policy.gate.noc_margin == 0.2
    with pytest.raises(
        PolicyError, match=r"project p: .*min_new_corrections: Input should be greater than or equal to 1"
    ):
        policy_for({"training": {"min_new_corrections": 0}}, settings, "p")
    with pytest.raises(PolicyError, match="min_new_correction: Extra inputs are not permitted"):
        policy_for({"training": {"min_new_correction": 5}}, settings, "p")
    with pytest.raises(PolicyError, match="must be a JSON object, not list"):
        policy_for({"training": [1]}, settings, "p")

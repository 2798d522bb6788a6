"""Fine-tuning SAM's mask decoder: the loop, the artifact, the policy and a run end to end on Ray Train.

The model is the tiny random SAM of test_engine_sam.py (a 128 px ViT of width 32), saved and loaded
through the real checkpoint path. Its encoder is random, so what the decoder can learn in a few
dozen steps is the synthetic images' rule (one bright disc or rectangle on a dark noisy ground):
from an untrained IoU near 0.1 to about 0.7 on the training prompts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import select

from seemly.config import Settings
from seemly.engines.base import EngineError, create_engine
from seemly.engines.sam import require_segment_anything

try:
    require_segment_anything()
except EngineError as exc:  # the optional package is missing: nothing here can run
    pytest.skip(f"segment_anything is not importable: {exc}", allow_module_level=True)

from seemly.bench.datasets import Sample
from seemly.db.models import Job, JobStatus
from seemly.learning import versions
from seemly.learning.data import TrainingPair
from seemly.learning.evaluate import evaluate_engine
from seemly.learning.gate import GatePolicy
from seemly.learning.loading import load_version
from seemly.learning.policy import PolicyError, policy_for
from seemly.learning.sam_artifact import (
    SamArtifactError,
    checkpoint_meta,
    merge_decoder,
    save_fine_tuned,
)
from seemly.learning.sam_decoder import (
    DecoderFitConfig,
    evaluate_decoder,
    fit_decoder,
    prepare_images,
)
from seemly.prompts import Box, Click, PromptRound, RoundResult
from seemly.storage import Storage, parse_uri, path_to_uri
from tests.test_engine_sam import build_tiny_sam
from tests.train_support import labelled_project, train_settings
from workers.train import TrainingError, TrainOptions, run_training
from workers.train_sam import served_engine

# 40 steps of 2 images x 2 sessions x 3 rounds: about 3 s on one core
FIT = DecoderFitConfig(epochs=1, min_steps=40, batch=2, sessions=2, rounds=3, lr=1e-2, threads=1)
ACCEPT = GatePolicy(noc_margin=-1.0, miou_tolerance=1.0, allow_more_failures=True)


def scene(seed: int, height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy image with one bright object: a disc (even seeds) or a rectangle (odd seeds)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 70, (height, width, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    if seed % 2 == 0:
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        radius = rng.uniform(0.15, 0.3) * height
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    else:
        x0, y0 = int(rng.integers(2, width // 2)), int(rng.integers(2, height // 2))
        mask = np.zeros((height, width), dtype=bool)
        mask[y0 : y0 + height // 4, x0 : x0 + width // 3] = True
    image[mask] = rng.integers(150, 250, 3)
    return image, mask


def pairs(count: int = 6) -> list[TrainingPair]:
    out = []
    for seed in range(count):
        image, mask = scene(seed)
        sha = f"{seed:04d}".ljust(64, "0")
        out.append(TrainingPair(seed, sha, "r1", "blob", image, mask, "test"))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sam-ft") / "sam_tiny.pth"
    torch.save(build_tiny_sam(0).state_dict(), path)
    return path


def tiny_engine(checkpoint: Path | str) -> Any:
    return create_engine("sam", checkpoint=str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def trained(checkpoint: Path) -> SimpleNamespace:
    """One fine-tuning of the tiny SAM on six images, with its before/after measurements."""
    engine = tiny_engine(checkpoint)
    base = copy.deepcopy(engine.model.state_dict())
    images = prepare_images(pairs(), int(engine.model.image_encoder.img_size))
    before = evaluate_decoder(engine, images, FIT)
    reports: list[dict[str, Any]] = []
    fit = fit_decoder(engine, images, FIT, report=lambda metrics, state: reports.append(metrics))
    after = evaluate_decoder(engine, images, FIT)
    return SimpleNamespace(
        engine=engine, base=base, images=images, fit=fit, before=before, after=after, reports=reports
    )


# --- the loop ------------------------------------------------------------------------------------


def test_images_travel_in_sams_input_frame() -> None:
    images = prepare_images(pairs(2), 128)
    assert [i.image.shape for i in images] == [(96, 128, 3), (96, 128, 3)]
    assert all(len(i.masks) == 1 and i.masks[0].shape == (96, 128) for i in images)
    # the disc keeps its share of the image through the resize
    assert abs(images[0].masks[0].mean() - scene(0)[1].mean()) < 0.01


def test_fine_tuning_lowers_the_loss_and_raises_the_iou_on_the_training_prompts(
    trained: SimpleNamespace,
) -> None:
    before, after = trained.before, trained.after
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    # every round: the served candidate's IoU after the first prompt and after each correction
    assert min(after["iou"]) > max(before["iou"]) + 0.3, (before, after)
    assert after["sessions"] == before["sessions"] == 12  # a click and a box session per region
    assert trained.fit.metrics["steps"] == 40 and trained.reports[-1]["steps"] == 40
    assert trained.reports[-1]["loss"] < trained.reports[0]["loss"]


def test_only_the_decoder_changes(trained: SimpleNamespace) -> None:
    now = trained.engine.model.state_dict()
    changed = {k for k in now if not torch.equal(now[k], trained.base[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert not any(p.requires_grad for p in trained.engine.model.parameters())  # frozen again
    assert set(trained.fit.state) == {k.removeprefix("mask_decoder.") for k in now if "mask_decoder." in k}


def test_fitting_is_deterministic_per_seed(checkpoint: Path) -> None:
    images = prepare_images(pairs(3), 128)
    config = FIT.model_copy(update={"min_steps": 0, "max_steps": 3})
    first = fit_decoder(tiny_engine(checkpoint), images, config).state
    again = fit_decoder(tiny_engine(checkpoint), images, config).state
    other = fit_decoder(tiny_engine(checkpoint), images, config.model_copy(update={"seed": 1})).state
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# --- the artifact --------------------------------------------------------------------------------


def test_the_artifact_loads_as_a_sam_checkpoint_and_serves_the_fine_tuned_decoder(
    trained: SimpleNamespace, checkpoint: Path, tmp_path: Path
) -> None:
    uri = path_to_uri(tmp_path / "sam.pth")
    save_fine_tuned(uri, Storage(file_roots=[tmp_path]), trained.base, trained.fit.state, {"job_id": 7})
    loaded = create_engine("sam", checkpoint=uri, device="cpu")
    base = tiny_engine(checkpoint)
    assert checkpoint_meta((tmp_path / "sam.pth").read_bytes()) == {"job_id": 7}
    assert loaded.model_version != base.model_version  # new weights, new cache keys

    image, _ = scene(0)
    rounds = [
        PromptRound(prompts=[Click(x=32.5, y=24.5)]),
        PromptRound(prompts=[Box(x0=8, y0=6, x1=50, y1=40)]),
    ]
    for prompt_round in rounds:
        served = loaded.segment(loaded.embed(image, "s"), prompt_round)
        in_memory = trained.engine.segment(trained.engine.embed(image, "s"), prompt_round)
        untrained = base.segment(base.embed(image, "s"), prompt_round)
        assert [s.mask for s in served] == [s.mask for s in in_memory]
        assert [s.mask for s in served] != [s.mask for s in untrained]

    # through the gate's own measurement (the benchmark's click simulator at full resolution)
    samples = [Sample(p.key, p.image, p.gt, None, Path(f"{p.image_id}")) for p in pairs()]
    fine_tuned = evaluate_engine(loaded, samples, max_clicks=3)
    untrained_result = evaluate_engine(base, samples, max_clicks=3)
    assert fine_tuned.miou_mean > untrained_result.miou_mean + 0.3


def test_a_decoder_of_another_shape_is_refused(trained: SimpleNamespace) -> None:
    state = dict(trained.fit.state)
    state["iou_token.weight"] = torch.zeros(3, 3)
    state.pop("mask_tokens.weight")
    with pytest.raises(
        SamArtifactError, match=r"missing \['mask_tokens.weight'\].*other shapes \['iou_token"
    ):
        merge_decoder(trained.base, state)


# --- the policy and the served engine -------------------------------------------------------------


def test_policy_chooses_the_base_engine_and_refuses_bad_ones() -> None:
    settings = Settings(database_url="sqlite://")
    assert policy_for({}, settings).base_engine == "classic"
    sam = policy_for({"training": {"base_engine": "sam", "base_checkpoint": "s3://m/sam.pth"}}, settings)
    assert (sam.base_engine, sam.base_checkpoint) == ("sam", "s3://m/sam.pth")
    # a sam deployment trains sam by default, from its checkpoint
    deployed = Settings(database_url="sqlite://", engine="sam", engine_checkpoint="/m/sam_vit_b.pth")
    assert (policy_for({}, deployed).base_engine, policy_for({}, deployed).base_checkpoint) == (
        "sam",
        "/m/sam_vit_b.pth",
    )
    with pytest.raises(
        PolicyError, match=r"project p: .*base_checkpoint: .*base_engine sam needs base_checkpoint"
    ):
        policy_for({"training": {"base_engine": "sam"}}, settings, "p")
    with pytest.raises(PolicyError, match=r"base_checkpoint: .*needs base_checkpoint"):
        policy_for({"training": {"base_engine": "sam", "base_checkpoint": " "}}, settings, "p")
    with pytest.raises(PolicyError, match=r"base_engine: .*'sam3' cannot be fine-tuned: training fine-tunes"):
        policy_for({"training": {"base_engine": "sam3", "base_checkpoint": "x.pth"}}, settings, "p")
    with pytest.raises(PolicyError, match=r"'sam2' cannot be fine-tuned.*set training.base_engine"):
        policy_for({}, Settings(database_url="sqlite://", engine="sam2"), "p")


def version(engine: str, artifact: str | None, name: str = "") -> versions.VersionInfo:
    return versions.VersionInfo(1, name or f"p1-{engine}-ft1", engine, 1, None, artifact, True, {}, None)


def test_the_promoted_version_decides_what_trains() -> None:
    settings = Settings(database_url="sqlite://")
    sam = policy_for({"training": {"base_engine": "sam", "base_checkpoint": "/m/base.pth"}}, settings)
    classic = policy_for({}, settings)
    assert served_engine(None, sam, settings) == ("sam", {"checkpoint": "/m/base.pth"})
    assert served_engine(None, classic, settings) == ("classic", {})
    # a promoted fine-tune wins over the policy's base engine
    assert served_engine(version("sam", "file:///a/sam.pth"), classic, settings) == (
        "sam",
        {"checkpoint": "file:///a/sam.pth"},
    )
    assert served_engine(version("classic", "file:///a/refiner.pt"), sam, settings) == (
        "classic",
        {"refiner_uri": "file:///a/refiner.pt"},
    )
    assert served_engine(version("sam", None), sam, settings) == ("sam", {"checkpoint": "/m/base.pth"})
    with pytest.raises(TrainingError, match=r"no checkpoint is configured"):
        served_engine(version("sam", None), classic, settings)
    with pytest.raises(TrainingError, match=r"p1-sam2-ft1 is a 'sam2' model; training fine-tunes"):
        served_engine(version("sam2", "file:///a/sam2.pt"), classic, settings)


# --- a run end to end -----------------------------------------------------------------------------


def test_a_sam_project_trains_its_decoder_on_ray_and_registers_a_sam_version(
    ray_local, postgres_db, postgres_url, tmp_path: Path, checkpoint: Path
) -> None:
    project_id = labelled_project(
        postgres_db,
        tmp_path,
        images=6,
        training={"base_engine": "sam", "base_checkpoint": path_to_uri(checkpoint)},
    )
    # the deployment serves this SAM (SEEMLY_ENGINE=sam), so the gate compares with the untuned base
    settings = train_settings(
        postgres_url, tmp_path, engine="sam", engine_checkpoint=path_to_uri(checkpoint), device="cpu"
    )
    options = TrainOptions(
        fit={"min_steps": 4, "max_steps": 4, "batch": 2, "sessions": 1, "rounds": 2, "lr": 1e-3},
        eval_max_clicks=3,
        refresh_label_model=False,
        heartbeat_s=0.5,
        gate=ACCEPT,
    )
    result = run_training("p-train", settings=settings, options=options)

    assert result.artifact_uri.endswith(f"/projects/{project_id}/train-{result.job_id}/sam.pth")
    assert result.train_metrics["steps"] == 4 and result.train_metrics["use_gpu"] is False
    info = versions.get(postgres_db, result.version.id)
    assert (info.name, info.engine, info.parent_id) == (f"p{project_id}-sam-ft1", "sam", None)
    assert info.promoted and info.decision is not None and info.decision["promote"] is True
    assert info.metrics["current_version"] == "sam (base)"
    assert {"noc90", "miou", "failures", "images", "current"} <= set(info.metrics)
    assert info.metrics["examples"] >= 1 and info.metrics["train"]["steps"] == 4
    with postgres_db.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == result.job_id)).one()
    assert job.status == JobStatus.SUCCEEDED and job.params["engine"] == "sam"

    # what Serve loads for the promoted version: the fine-tuned checkpoint, only its decoder changed
    served = load_version(versions.promoted_version(postgres_db, project_id), device="cpu")
    assert served.model_version == info.name and served.inner.name == "sam"
    data = Path(parse_uri(result.artifact_uri).path).read_bytes()  # type: ignore[union-attr]
    assert checkpoint_meta(data)["job_id"] == result.job_id
    base = torch.load(checkpoint, weights_only=True)
    tuned = served.inner.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)


def test_a_registered_sam_version_segments_through_load_version(checkpoint: Path) -> None:
    served = load_version(version("sam", path_to_uri(checkpoint)), device="cpu")
    image, _ = scene(0)
    state = served.embed(image, "x")
    assert state.model_version == "p1-sam-ft1"  # what caches and stored masks key on
    first = PromptRound(prompts=[Click(x=30, y=20)])
    segments = served.segment(state, first)
    assert segments and segments[0].model_version == "p1-sam-ft1"
    # a later round with the first one as memory (SAM gets its logits back as mask input)
    memory = [RoundResult(round=first, mask=segments[0].mask, score=segments[0].score)]
    later = served.segment(state, PromptRound(prompts=[Click(x=5, y=5, positive=False)]), memory)
    assert later and later[0].model_version == "p1-sam-ft1"
    assert served.segment_everything(state) is not None
    # a state another model embedded is still refused, with the inner engine's message
    other = load_version(version("sam", path_to_uri(checkpoint), name="p1-sam-ft2"), device="cpu")
    with pytest.raises(EngineError, match="embed again"):
        other.segment(state, first)


def test_the_gate_measures_against_what_the_project_is_served_now() -> None:
    from workers.train import _served_now

    base = object()
    classic = Settings(database_url="sqlite://")
    deployed = Settings(database_url="sqlite://", engine="sam", engine_checkpoint="/m/base.pth")
    sam_options = {"checkpoint": "/m/base.pth"}
    assert _served_now(None, "sam", sam_options, base, deployed) == (base, "sam (base)")
    assert _served_now(None, "classic", {}, base, classic) == (base, "classic (base)")
    promoted = version("sam", "file:///a/sam.pth")
    assert _served_now(promoted, "sam", {"checkpoint": "file:///a/sam.pth"}, base, classic) == (
        base,
        "p1-sam-ft1",
    )
    engine, name = _served_now(None, "sam", sam_options, base, classic)  # opted into SAM, served classic
    assert name == "classic (served base)" and engine is not base and engine.name == "classic"

"""The SAM and SAM 2 adapters, on tiny randomly initialised models loaded through the real checkpoint path.

No pretrained weights exist on this machine: every test builds the official architecture classes at
test size (``tiny`` SAM: ViT of width 32, 128 px input; ``micro`` SAM 2.1: 5 Hiera blocks of width 8),
saves the state dict to a checkpoint file and loads it exactly as a user's checkpoint would be loaded.
Outputs of random weights mean nothing, so the tests check contracts: shapes, types, ordering, which
prompts reach the model, agreement with the official predictors, and error messages.

The only skip: the GPU test without a CUDA device.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from seemly.engines import checkpoints, torchvision_compat
from seemly.engines.base import EngineError, UnsupportedPromptError, available_engines, create_engine
from seemly.engines.sam import (
    LOGIT_MAGNITUDE,
    SAM_PRESETS,
    PointPrompts,
    SamArchitecture,
    SamState,
    collect_prompts,
    interior_points,
    mask_key,
    require_segment_anything,
    resolve_device,
    resolve_precision,
    stroke_points,
)
from seemly.engines.sam2 import SAM2_PRESETS, detect_preset, require_sam2
from seemly.masks import Mask
from seemly.prompts import (
    Box,
    Click,
    MaskPrompt,
    Polygon,
    PromptRound,
    Reference,
    RoundResult,
    Scribble,
    Text,
)

HEIGHT, WIDTH = 48, 64
EVERYTHING = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


# --- fixtures ----------------------------------------------------------------------------------------


def build_tiny_sam(seed: int = 0, **changes: Any) -> torch.nn.Module:
    require_segment_anything()
    torch.manual_seed(seed)
    architecture = SAM_PRESETS["tiny"]
    if changes:
        architecture = SamArchitecture(**{**architecture.__dict__, **changes})
    model = architecture.build()
    with torch.no_grad():  # SAM zero-initialises rel_pos: make them random too, to test their loading
        for name, parameter in model.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(std=0.02)
    return model


def build_micro_sam2(seed: int = 0) -> torch.nn.Module:
    require_sam2()
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    config, overrides = SAM2_PRESETS["micro"]
    return build_sam2(config, None, device="cpu", hydra_overrides_extra=list(overrides))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def sam_checkpoint(ckpt_dir: Path) -> Path:
    path = ckpt_dir / "sam_tiny.pth"
    torch.save(build_tiny_sam(0).state_dict(), path)  # a bare state dict, as SAM ships
    return path


@pytest.fixture(scope="module")
def sam2_checkpoint(ckpt_dir: Path) -> Path:
    path = ckpt_dir / "sam2_micro.pt"
    torch.save({"model": build_micro_sam2(0).state_dict()}, path)  # SAM 2's {"model": ...} wrapper
    return path


@pytest.fixture(scope="module")
def checkpoint_paths(sam_checkpoint: Path, sam2_checkpoint: Path) -> dict[str, Path]:
    return {"sam": sam_checkpoint, "sam2": sam2_checkpoint}


@pytest.fixture(scope="module", params=["sam", "sam2"])
def engine(request: pytest.FixtureRequest, checkpoint_paths: dict[str, Path], ckpt_dir: Path) -> Any:
    return create_engine(
        request.param,
        checkpoint=str(checkpoint_paths[request.param]),
        device="cpu",
        cache_dir=ckpt_dir / "cache",
        everything=EVERYTHING,
    )


def make_image(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    image = np.full((height, width, 3), (40, 90, 160), dtype=np.uint8)
    cv2.rectangle(image, (width // 4, height // 4), (3 * width // 4, 3 * height // 4), (230, 200, 30), -1)
    noise = np.random.default_rng(0).integers(0, 20, image.shape, dtype=np.uint8)
    return image + noise


@pytest.fixture(scope="module")
def state(engine: Any) -> SamState:
    return engine.embed(make_image(), "sha-test")


def one(*prompts: Any, label: str | None = None) -> PromptRound:
    return PromptRound(prompts=list(prompts), label=label)


def rect_mask(r0: int, r1: int, c0: int, c1: int, height: int = HEIGHT, width: int = WIDTH) -> Mask:
    data = np.zeros((height, width), dtype=bool)
    data[r0:r1, c0:c1] = True
    return Mask(data)


class PromptSpy:
    """Records the keyword arguments of every prompt-encoder call."""

    def __init__(self, engine: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = engine.prompt_encoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append(dict(kwargs))

    def __enter__(self) -> PromptSpy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def spy_points(engine: Any, call: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(coords, labels) the prompt encoder received (SAM 2 folds a box into the points as labels 2, 3)."""
    points = call["points"]
    if points is None:
        return np.zeros((0, 2)), np.zeros((0,))
    return points[0][0].cpu().numpy(), points[1][0].cpu().numpy()


# --- registry and laziness ---------------------------------------------------------------------------


def test_engines_are_registered_and_importing_them_loads_no_model_package() -> None:
    assert {"sam", "sam2"} <= set(available_engines())
    code = (
        "import sys; from seemly.engines.base import available_engines; names = available_engines(); "
        "heavy = [m for m in ('segment_anything', 'sam2', 'torchvision') if m in sys.modules]; "
        "print(names, heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "'sam'" in out.stdout and "'sam2'" in out.stdout
    assert out.stdout.strip().endswith("[]"), out.stdout


def test_missing_checkpoint_setting_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="SEEMLY_ENGINE_CHECKPOINT"):
        create_engine("sam", checkpoint="", device="cpu")


# --- embed / segment contracts -----------------------------------------------------------------------


def test_embed_keeps_features_and_sizes(
    engine: Any, state: SamState, checkpoint_paths: dict[str, Path]
) -> None:
    digest = checkpoints.sha256_file(checkpoint_paths[engine.name])
    expected_type = "tiny" if engine.name == "sam" else "micro"
    assert engine.model_version == f"{engine.name}-{expected_type}-{digest[:8]}"
    assert (state.height, state.width, state.sha256) == (HEIGHT, WIDTH, "sha-test")
    assert state.model_version == engine.model_version
    if engine.name == "sam":
        assert state.input_size == (96, 128)  # longest side resized to img_size 128
        assert tuple(state.features.shape) == (1, 32, 8, 8)
    else:
        assert state.input_size == (128, 128)  # SAM 2 squeezes into its square input
        assert tuple(state.features["image_embed"].shape) == (1, 32, 8, 8)
        assert [tuple(f.shape) for f in state.features["high_res_feats"]] == [(1, 4, 32, 32), (1, 8, 16, 16)]
    assert state.nbytes() >= 32 * 8 * 8 * 4


def test_single_click_gives_three_candidates_best_first(engine: Any, state: SamState) -> None:
    segments = engine.segment(state, one(Click(x=30.5, y=20.5), label="cat"))
    assert len(segments) == 3
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)
    for segment in segments:
        assert segment.mask.shape == (HEIGHT, WIDTH) and segment.mask.data.dtype == bool
        assert isinstance(segment.score, float) and 0.0 <= segment.score <= 1.0
        assert segment.model_version == engine.model_version
        assert segment.label == "cat"


@pytest.mark.parametrize(
    "prompts",
    [
        [Click(x=10, y=10), Click(x=40, y=30, positive=False)],
        [Box(x0=16, y0=12, x1=48, y1=36)],
        [Box(x0=16, y0=12, x1=48, y1=36), Click(x=30, y=24)],
        [Scribble(points=[(20, 20), (40, 22), (44, 30)])],
        [Scribble(points=[(2, 2), (60, 3)], positive=False), Click(x=30, y=24)],
        [Polygon(points=[(16, 12), (48, 12), (48, 36), (16, 36)])],
        [Polygon(points=[(0, 0), (10, 0), (10, 10)], positive=False), Click(x=30, y=24)],
        [MaskPrompt(rle=rect_mask(12, 36, 16, 48).to_coco_rle())],
        [
            MaskPrompt(rle=rect_mask(12, 36, 16, 48).to_coco_rle()),
            MaskPrompt(rle=rect_mask(20, 30, 20, 30).to_coco_rle(), positive=False),
        ],
        [Click(x=WIDTH, y=HEIGHT)],  # far-edge click: clamped into the last pixel
    ],
    ids=[
        "clicks",
        "box",
        "box+click",
        "scribble",
        "neg-scribble+click",
        "polygon",
        "neg-polygon+click",
        "mask",
        "mask-neg",
        "edge",
    ],
)
def test_every_visual_prompt_kind(engine: Any, state: SamState, prompts: list[Any]) -> None:
    segments = engine.segment(state, one(*prompts))
    expected = 3 if len(prompts) == 1 and isinstance(prompts[0], Click) else 1
    assert len(segments) == expected
    for segment in segments:
        assert segment.mask.shape == (HEIGHT, WIDTH)
        assert 0.0 <= segment.score <= 1.0


@pytest.mark.parametrize(
    "prompt",
    [Text(text="a cat"), Reference(image_uri="s3://b/k.png", rle=rect_mask(1, 5, 1, 5).to_coco_rle())],
)
def test_text_and_reference_are_unsupported(engine: Any, state: SamState, prompt: Any) -> None:
    with pytest.raises(UnsupportedPromptError, match=f"cannot follow {prompt.kind} prompts"):
        engine.segment(state, one(Click(x=5, y=5), prompt))


def test_mask_prompt_of_another_size_is_a_client_error(engine: Any, state: SamState) -> None:
    with pytest.raises(UnsupportedPromptError, match="mask is 10x10 but the image is 64x48"):
        engine.segment(state, one(MaskPrompt(rle=Mask.full(10, 10).to_coco_rle())))


def test_state_from_another_engine_is_refused(engine: Any) -> None:
    from seemly.engines.base import ImageState

    with pytest.raises(EngineError, match="needs the state from its own embed"):
        engine.segment(ImageState("x", "classic-1", HEIGHT, WIDTH), one(Click(x=1, y=1)))


def test_prompt_reaches_the_model_in_sam_coordinates(engine: Any, state: SamState) -> None:
    with PromptSpy(engine) as spy:
        engine.segment(state, one(Click(x=32.5, y=24.5), Click(x=8.25, y=40.75, positive=False)))
    coords, labels = spy_points(engine, spy.calls[-1])
    assert labels.tolist() == [1, 0]
    # continuous (x, y) -> pixel index (x - 0.5, y - 0.5) -> the model's input frame
    if engine.name == "sam":
        scale = 128 / WIDTH  # ResizeLongestSide: 64 x 48 -> 128 x 96
        expected = np.array([[32.0 * scale, 24.0 * scale], [7.75 * scale, 40.25 * scale]])
    else:
        expected = np.array(
            [[32.0 / WIDTH * 128, 24.0 / HEIGHT * 128], [7.75 / WIDTH * 128, 40.25 / HEIGHT * 128]]
        )
    np.testing.assert_allclose(coords, expected, rtol=1e-5)


def test_box_and_mask_prompts_reach_the_model(engine: Any, state: SamState) -> None:
    region = rect_mask(12, 36, 16, 48)
    with PromptSpy(engine) as spy:
        engine.segment(state, one(MaskPrompt(rle=region.to_coco_rle())))
    call = spy.calls[-1]
    assert call["masks"] is not None
    low = call["masks"][0, 0].cpu().numpy()
    assert low.max() == pytest.approx(LOGIT_MAGNITUDE) and low.min() == pytest.approx(-LOGIT_MAGNITUDE)
    if engine.name == "sam":
        box = call["boxes"][0].cpu().numpy()  # corner pixels (16, 12) and (47, 35), scaled by 2
        np.testing.assert_allclose(box, [32, 24, 94, 70])
    else:
        _coords, labels = spy_points(engine, call)
        assert labels.tolist() == [2, 3]  # SAM 2 passes the box as two labelled corner points


# --- memory ------------------------------------------------------------------------------------------


def test_second_round_passes_the_previous_logits_and_all_clicks(engine: Any, state: SamState) -> None:
    first_round = one(Click(x=30, y=20))
    second_round = one(Click(x=50, y=40, positive=False))
    with PromptSpy(engine) as spy:
        first = engine.segment(state, first_round)
        chosen = first[1]  # the annotator may pick any candidate; its own logits must come back
        second = engine.segment(state, second_round, [RoundResult(first_round, chosen.mask, chosen.score)])
    assert spy.calls[0]["masks"] is None
    passed = spy.calls[1]["masks"]
    assert passed is not None
    remembered = state.recall(mask_key(chosen.mask.data))
    assert remembered is not None
    np.testing.assert_array_equal(passed[0].cpu().numpy(), remembered)
    assert not np.allclose(np.abs(remembered), LOGIT_MAGNITUDE)  # model logits, not the fallback
    _coords, labels = spy_points(engine, spy.calls[1])
    assert labels.tolist() == [1, 0]  # the first round's click is still there
    assert len(second) == 1  # several prompts: one mask, as SAM recommends


def test_memory_mask_from_elsewhere_is_downsampled_to_logits(engine: Any, state: SamState) -> None:
    previous_round = one(Click(x=30, y=20))
    edited = rect_mask(10, 30, 10, 40)  # e.g. the annotator's brush edit: no logits remembered for it
    with PromptSpy(engine) as spy:
        engine.segment(state, one(Click(x=5, y=5, positive=False)), [RoundResult(previous_round, edited)])
    passed = spy.calls[-1]["masks"][0].cpu().numpy()
    np.testing.assert_allclose(passed, engine._logits_from_mask(state, edited.data))
    assert passed.max() == pytest.approx(LOGIT_MAGNITUDE)


def test_memory_logits_cache_is_bounded(engine: Any) -> None:
    from seemly.engines import sam as sam_module

    fresh = engine.embed(make_image(), "sha-cache")
    for index in range(sam_module.LOGITS_CACHE_SIZE + 5):
        fresh.remember(f"k{index}", np.zeros((1, 4, 4), np.float32))
    assert len(fresh.logits) == sam_module.LOGITS_CACHE_SIZE
    assert fresh.recall("k0") is None and fresh.recall(f"k{sam_module.LOGITS_CACHE_SIZE + 4}") is not None


# --- agreement with the official predictors ----------------------------------------------------------


def test_segment_matches_the_official_predictor(engine: Any, state: SamState) -> None:
    image = make_image()
    points = np.array([[29.5, 19.5], [9.5, 39.5]], dtype=np.float32)  # pixel indices of the clicks below
    labels = np.array([1, 0])
    box = np.array([16, 12, 47, 35], dtype=np.float32)
    if engine.name == "sam":
        from segment_anything import SamPredictor

        predictor = SamPredictor(engine.model)
    else:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(engine.model)
        predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # the official values assume 1024 px
    with torch.no_grad():
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(
            point_coords=points, point_labels=labels, box=box, multimask_output=False
        )
    ours = engine.segment(
        state, one(Click(x=30, y=20), Click(x=10, y=40, positive=False), Box(x0=16, y0=12, x1=48, y1=36))
    )
    assert len(ours) == 1
    np.testing.assert_array_equal(ours[0].mask.data, masks[0] > 0)
    assert ours[0].score == pytest.approx(float(np.clip(scores[0], 0, 1)), abs=1e-5)


# --- everything --------------------------------------------------------------------------------------


def test_segment_everything_is_non_overlapping_and_best_first(engine: Any, state: SamState) -> None:
    segments = engine.segment_everything(state)
    assert segments, "with the filters off, the grid must propose something"
    stack = np.stack([s.mask.data for s in segments])
    assert stack.sum(axis=0).max() <= 1
    assert all(not s.mask.is_empty for s in segments)
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)
    assert all(s.model_version == engine.model_version for s in segments)


# --- checkpoints -------------------------------------------------------------------------------------


def test_reload_gives_the_same_outputs(
    engine: Any, state: SamState, checkpoint_paths: dict[str, Path], ckpt_dir: Path
) -> None:
    again = create_engine(engine.name, checkpoint=f"file://{checkpoint_paths[engine.name]}", device="cpu")
    assert again.model_version == engine.model_version
    other_state = again.embed(make_image(), "sha-test")
    prompt = one(Click(x=30, y=20), Click(x=50, y=40, positive=False))
    a, b = engine.segment(state, prompt), again.segment(other_state, prompt)
    np.testing.assert_array_equal(a[0].mask.data, b[0].mask.data)
    assert a[0].score == b[0].score


def test_new_weights_change_the_model_version(sam_checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save(build_tiny_sam(1).state_dict(), other)
    first = create_engine("sam", checkpoint=str(sam_checkpoint), device="cpu")
    second = create_engine("sam", checkpoint=str(other), model_type="tiny", device="cpu")
    assert first.model_version.startswith("sam-tiny-") and second.model_version.startswith("sam-tiny-")
    assert first.model_version != second.model_version


def test_wrapped_and_ddp_prefixed_checkpoints_load(sam_checkpoint: Path, tmp_path: Path) -> None:
    state_dict = torch.load(sam_checkpoint, weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, path)
    engine = create_engine("sam", checkpoint=str(path), device="cpu")
    assert engine.model_type == "tiny"


def test_wrong_architecture_names_the_mismatching_keys(
    tmp_path: Path, sam_checkpoint: Path, sam2_checkpoint: Path
) -> None:
    wider = tmp_path / "wider.pth"
    torch.save(build_tiny_sam(0, encoder_embed_dim=48).state_dict(), wider)
    with pytest.raises(checkpoints.CheckpointArchitectureError) as info:
        create_engine("sam", checkpoint=str(wider), model_type="tiny", device="cpu")
    message = str(info.value)
    assert "does not fit SAM tiny" in message and "shape mismatches" in message
    assert "image_encoder.pos_embed (checkpoint (1, 8, 8, 48), model (1, 8, 8, 32))" in message

    state_dict = torch.load(sam_checkpoint, weights_only=True)
    del state_dict["mask_decoder.iou_token.weight"]
    state_dict["extra.head.weight"] = torch.zeros(2)
    broken = tmp_path / "broken.pth"
    torch.save(state_dict, broken)
    with pytest.raises(
        checkpoints.CheckpointArchitectureError,
        match=r"1 missing keys: mask_decoder\.iou_token\.weight; 1 unexpected keys: extra\.head\.weight",
    ):
        create_engine("sam", checkpoint=str(broken), model_type="tiny", device="cpu")

    with pytest.raises(
        checkpoints.CheckpointArchitectureError, match=r"does not look like a SAM .*use the sam2 engine"
    ):
        create_engine("sam", checkpoint=str(sam2_checkpoint), device="cpu")
    with pytest.raises(
        checkpoints.CheckpointArchitectureError, match="does not look like a SAM 2 checkpoint"
    ):
        create_engine("sam2", checkpoint=str(sam_checkpoint), device="cpu")
    with pytest.raises(checkpoints.CheckpointArchitectureError, match=r"does not fit SAM 2 sam2\.1_hiera_t"):
        create_engine("sam2", checkpoint=str(sam2_checkpoint), model_type="sam2.1_hiera_t", device="cpu")
    with pytest.raises(EngineError, match="unknown SAM model_type 'vit_x'"):
        create_engine("sam", checkpoint=str(sam_checkpoint), model_type="vit_x", device="cpu")


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "sam_vit_b.pth"
    with pytest.raises(checkpoints.CheckpointNotFoundError, match=r"no such file .*sam_vit_b\.pth"):
        create_engine("sam", checkpoint=str(missing), device="cpu")
    with pytest.raises(checkpoints.CheckpointNotFoundError):
        create_engine("sam", checkpoint=f"file://{missing}", device="cpu")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(checkpoints.CheckpointCorruptError, match="corrupt or truncated"):
        create_engine("sam", checkpoint=str(garbage), device="cpu")

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(checkpoints.CheckpointCorruptError, match="corrupt or truncated"):
        create_engine("sam", checkpoint=str(truncated), device="cpu")

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": zipfile.ZipInfo("x")}, pickled)
    with pytest.raises(checkpoints.CheckpointCorruptError, match="weights_only=True"):
        create_engine("sam", checkpoint=str(pickled), device="cpu")

    with pytest.raises(checkpoints.CheckpointError, match="unsupported scheme 'http'"):
        create_engine("sam", checkpoint="http://example.com/sam.pth", device="cpu")


def test_s3_checkpoint_is_downloaded_once_and_cached(
    s3_bucket: Any,
    sam_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = s3_bucket.put("models/sam_tiny.pth", sam_checkpoint.read_bytes())
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="seemly.engines.checkpoints")
    engine = create_engine("sam", checkpoint=uri, storage=s3_bucket.storage, cache_dir=cache, device="cpu")
    digest = checkpoints.sha256_file(sam_checkpoint)
    assert engine.model_version == f"sam-tiny-{digest[:8]}"
    assert digest in caplog.text  # the sha256 is logged
    assert len(list(cache.rglob("sam_tiny.pth"))) == 1

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(s3_bucket.storage.s3_client, "download_file", no_download)
    again = create_engine("sam", checkpoint=uri, storage=s3_bucket.storage, cache_dir=cache, device="cpu")
    assert again.model_version == engine.model_version

    with pytest.raises(checkpoints.CheckpointNotFoundError, match="no such S3 object"):
        create_engine(
            "sam", checkpoint=s3_bucket.uri("models/missing.pth"), storage=s3_bucket.storage, cache_dir=cache
        )


# --- architectures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_presets_match_the_official_builders(name: str) -> None:
    require_segment_anything()
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = SAM_PRESETS[name].build().state_dict()
        official = sam_model_registry[name]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    assert SamArchitecture.from_state_dict(official) == SAM_PRESETS[name]


def test_sam2_official_configurations_are_recognised() -> None:
    require_sam2()
    from sam2.build_sam import build_sam2

    # Hiera calls .item() while building, so no meta device: the real tiny (39 M parameters) on CPU.
    model = build_sam2(SAM2_PRESETS["sam2.1_hiera_t"][0], None, device="cpu")
    assert detect_preset(model.state_dict()) == "sam2.1_hiera_t"
    legacy = {k: v for k, v in model.state_dict().items() if k != "no_obj_embed_spatial"}
    assert detect_preset(legacy) == "sam2_hiera_t"
    del model, legacy
    assert detect_preset(build_micro_sam2().state_dict()) == "micro"


# --- prompt translation (pure) -----------------------------------------------------------------------


def test_collect_prompts_accumulates_clicks_and_keeps_the_latest_box() -> None:
    rounds = [
        one(Box(x0=1, y0=2, x1=30, y1=20)),
        one(Click(x=5, y=6)),
        one(Polygon(points=[(2, 2), (12, 2), (12, 12), (2, 12)])),
    ]
    memory = [RoundResult(r, rect_mask(0, 5, 0, 5)) for r in rounds]
    prompts = collect_prompts(
        one(
            Click(x=40, y=30, positive=False), Box(x0=10, y0=10, x1=20, y1=20), Box(x0=15, y0=5, x1=25, y1=15)
        ),
        memory,
        HEIGHT,
        WIDTH,
    )
    assert prompts.points[0] == (5, 6, 1)
    assert all(label == 1 for _, _, label in prompts.points[1:-1])  # polygon interior points
    assert prompts.points[-1] == (40, 30, 0)
    assert prompts.box == (10, 5, 25, 20)  # the union of this round's boxes replaces older ones
    assert prompts.mask is None and not prompts.ambiguous


def test_polygon_gives_box_and_interior_points_and_scribble_gives_points_along_it() -> None:
    prompts = collect_prompts(
        one(Polygon(points=[(10, 10), (50, 10), (50, 30), (10, 30)])), [], HEIGHT, WIDTH
    )
    assert prompts.box == (10, 10, 50, 30)
    assert 1 <= len(prompts.points) <= 3
    for x, y, label in prompts.points:
        assert label == 1 and 10 < x < 50 and 10 < y < 30
    negative = collect_prompts(
        one(Polygon(points=[(10, 10), (50, 10), (50, 30)], positive=False)), [], HEIGHT, WIDTH
    )
    assert negative.box is None and all(label == 0 for *_, label in negative.points)

    points = stroke_points([(0, 0), (100, 0)])
    assert (
        len(points) == 6
        and points[0] == pytest.approx((100 / 12, 0))
        and points[-1] == pytest.approx((100 - 100 / 12, 0))
    )
    assert stroke_points([(3, 4)]) == [(3.0, 4.0)]
    assert len(stroke_points([(0, 0), (10, 0)])) == 1  # shorter than the spacing: its middle
    deep = interior_points(rect_mask(10, 31, 10, 31).data, 3)
    assert deep[0] == pytest.approx((20.5, 20.5))  # the centre of the square is deepest
    assert len(deep) == 3 and all(np.hypot(x - 20.5, y - 20.5) >= 2 for x, y in deep[1:])
    assert interior_points(np.zeros((5, 5), bool), 3) == []


def test_sam_coordinates() -> None:
    prompts = PointPrompts([(10.5, 20.5, 1), (WIDTH, HEIGHT, 0), (0.0, 0.0, 1)], (2, 3, 5, 7), None, None)
    coords, labels = prompts.point_arrays(HEIGHT, WIDTH)
    np.testing.assert_allclose(coords, [[10, 20], [WIDTH - 1, HEIGHT - 1], [0, 0]])
    assert labels.tolist() == [1, 0, 1]
    np.testing.assert_allclose(prompts.box_array(HEIGHT, WIDTH), [2, 3, 4, 6])  # corner pixels covered
    thin = PointPrompts([], (2.2, 3.0, 2.6, 3.5), None, None)
    np.testing.assert_allclose(thin.box_array(HEIGHT, WIDTH), [2.2, 3.0, 2.2, 3.0])


def test_everything_options_and_devices_are_validated(sam_checkpoint: Path) -> None:
    with pytest.raises(EngineError, match="unknown everything option"):
        create_engine("sam", checkpoint=str(sam_checkpoint), device="cpu", everything={"crop_n_layers": 1})
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EngineError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(EngineError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA device is available"):
            resolve_device("cuda")


def test_bf16_autocast_on_cpu_runs(sam_checkpoint: Path) -> None:
    engine = create_engine("sam", checkpoint=str(sam_checkpoint), device="cpu", precision="bf16")
    segments = engine.segment(engine.embed(make_image(), "x"), one(Click(x=30, y=20)))
    assert len(segments) == 3 and segments[0].mask.shape == (HEIGHT, WIDTH)


# --- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam", "sam2"])
def test_gpu_path_matches_cpu(name: str, checkpoint_paths: dict[str, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device: torch.cuda.is_available() is False, so the cuda + autocast path cannot run here"
        )
    checkpoint = str(checkpoint_paths[name])
    cpu = create_engine(name, checkpoint=checkpoint, device="cpu")
    gpu32 = create_engine(name, checkpoint=checkpoint, device="cuda", precision="fp32")
    gpu = create_engine(name, checkpoint=checkpoint, device="auto")  # autocast bf16 / fp16
    assert gpu.device.type == "cuda" and gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    image = make_image()
    prompt = one(Click(x=30, y=20), Box(x0=16, y0=12, x1=48, y1=36))
    reference = cpu.segment(cpu.embed(image, "x"), prompt)[0]
    state32 = gpu32.embed(image, "x")
    assert next(iter(_features(state32))).device.type == "cuda"
    exact = gpu32.segment(state32, prompt)[0]
    # fp32 on the GPU differs from the CPU only by rounding (cuDNN may use TF32 for convolutions)
    assert np.mean(exact.mask.data != reference.mask.data) < 0.01
    assert exact.score == pytest.approx(reference.score, abs=1e-2)
    state = gpu.embed(image, "x")
    first = gpu.segment(state, one(Click(x=30, y=20)))
    assert len(first) == 3 and first[0].mask.shape == (HEIGHT, WIDTH)
    second = gpu.segment(
        state, one(Click(x=50, y=40, positive=False)), [RoundResult(one(Click(x=30, y=20)), first[0].mask)]
    )
    assert len(second) == 1
    assert gpu.segment_everything(state) is not None


def _features(state: SamState) -> list[torch.Tensor]:
    from seemly.engines.sam import _tensors

    return list(_tensors(state.features))


# --- the torchvision shim ----------------------------------------------------------------------------


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            x0, y0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x1, y1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            area_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            if inter / (area_i + area_j - inter) > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_shim_nms_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (200, 2))], axis=1)
    scores = rng.uniform(0, 1, 200)
    kept = torchvision_compat.nms(torch.tensor(boxes), torch.tensor(scores), 0.5)
    assert kept.dtype == torch.int64
    assert kept.tolist() == _reference_nms(boxes, scores, 0.5)
    # batched: categories never suppress each other
    idxs = torch.tensor([0, 1, 0])
    two = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], dtype=torch.float32)
    assert torchvision_compat.batched_nms(two, torch.tensor([0.9, 0.8, 0.7]), idxs, 0.5).tolist() == [0, 1]
    assert torchvision_compat.batched_nms(two[:0], torch.tensor([]), idxs[:0], 0.5).tolist() == []
    assert torchvision_compat.box_area(two).tolist() == [100, 100, 81]


def test_shim_transforms() -> None:
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    pil = torchvision_compat.to_pil_image(array)
    resized = np.array(torchvision_compat.resize(pil, (15, 20)))
    np.testing.assert_array_equal(
        resized, np.array(Image.fromarray(array).resize((20, 15), Image.Resampling.BILINEAR))
    )
    tensor = torchvision_compat.to_tensor(array)
    assert tensor.shape == (3, 30, 40) and tensor.dtype == torch.float32 and float(tensor.max()) <= 1.0
    scripted = torch.jit.script(
        torch.nn.Sequential(
            torchvision_compat.Resize((16, 16)), torchvision_compat.Normalize([0.5] * 3, [0.25] * 3)
        )
    )
    out = scripted(tensor)
    expected = (
        torch.nn.functional.interpolate(tensor[None], (16, 16), mode="bilinear", antialias=True)[0] - 0.5
    ) / 0.25
    torch.testing.assert_close(out, expected)
    assert torchvision_compat.resize(tensor, [10, 12]).shape == (3, 10, 12)


@pytest.fixture
def clean_torchvision(monkeypatch: pytest.MonkeyPatch) -> Any:
    """sys.modules without any torchvision for the test; the previous entries come back afterwards."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    return monkeypatch


def test_shim_is_installed_only_when_torchvision_is_missing(
    clean_torchvision: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec
    clean_torchvision.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchvision" else real_find_spec(name, *a),
    )
    assert torchvision_compat.ensure_torchvision() is True
    import torchvision
    from torchvision.ops.boxes import batched_nms

    assert torchvision_compat.is_shim(torchvision) and batched_nms is torchvision_compat.batched_nms
    assert torchvision_compat.ensure_torchvision() is True  # idempotent
    with pytest.raises(ImportError, match="RandomHorizontalFlip"):
        from torchvision.transforms import RandomHorizontalFlip  # noqa: F401
    with pytest.raises(AttributeError, match="torchvision is not installed"):
        _ = torchvision.transforms.RandomHorizontalFlip
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("torchvision.models")
    torchvision_compat.uninstall_shim()
    assert "torchvision" not in sys.modules


def test_a_real_torchvision_wins_and_a_broken_one_falls_back(
    clean_torchvision: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "real" / "torchvision"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    clean_torchvision.syspath_prepend(str(tmp_path / "real"))
    importlib.invalidate_caches()
    assert torchvision_compat.ensure_torchvision() is False
    assert sys.modules["torchvision"].REAL is True
    del sys.modules["torchvision"]

    broken = tmp_path / "broken" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    clean_torchvision.syspath_prepend(str(tmp_path / "broken"))
    importlib.invalidate_caches()
    with caplog.at_level(logging.WARNING, logger="seemly.engines.torchvision_compat"):
        assert torchvision_compat.ensure_torchvision() is True
    assert "cannot be imported" in caplog.text and "torchvision::nms" in caplog.text
    torchvision_compat.uninstall_shim()


# --- the NoC benchmark path --------------------------------------------------------------------------


def test_bench_interactive_runs_with_a_sam_checkpoint(sam_checkpoint: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    for sub in ("images", "masks"):
        (dataset / sub).mkdir(parents=True)
    for index, stem in enumerate(("a", "b")):
        image = make_image(40 + 8 * index, 56)
        gt = np.zeros(image.shape[:2], dtype=np.uint8)
        gt[10:30, 14:42] = 255
        cv2.imwrite(str(dataset / "images" / f"{stem}.png"), image[:, :, ::-1])
        cv2.imwrite(str(dataset / "masks" / f"{stem}.png"), gt)
    out = tmp_path / "bench.json"
    env = {**os.environ, "SEEMLY_HOME": str(tmp_path / "home"), "SEEMLY_DEVICE": "cpu"}
    command = [
        sys.executable, "-c", "import sys; from seemly.cli import main; sys.exit(main())",
        "bench", "interactive", "--engine", "sam", "--checkpoint", str(sam_checkpoint),
        "--dataset", str(dataset), "--max-clicks", "2", "--json", str(out), "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sam" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["engines"] == ["sam"] and payload["images"] == 2
    rows = payload["results"]
    assert len(rows) == 2 and all(row["engine"] == "sam" for row in rows)
    assert all(1 <= len(row["ious"]) <= 2 for row in rows)

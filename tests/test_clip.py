"""open_clip for real: the torchvision shim's transforms, and ClipScorer on a tiny random CLIP.

The model is a randomly initialised open_clip configuration small enough to build in a second
(``TINY``: one-layer ViT on 32x32 crops, one-layer text transformer, 16-d embeddings), registered
from a model config JSON, saved as a plain state_dict and loaded back through ``fetch_checkpoint``
from a path, ``file://`` and ``s3://`` (moto).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from seemly.engines import torchvision_compat as tv
from seemly.engines.checkpoints import CheckpointArchitectureError, CheckpointNotFoundError
from seemly.engines.clip_scorer import OPEN_CLIP_VERSION, ClipScorer, ClipUnavailableError, _import_open_clip

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
OTHER = {**TINY, "embed_dim": 8}  # same towers, another projection: a different architecture


def _config(folder: Path, name: str, config: dict[str, Any]) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _checkpoint(folder: Path, name: str, config: dict[str, Any], seed: int = 0) -> tuple[Path, Path]:
    open_clip = _import_open_clip()
    config_path = _config(folder, name, config)
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return config_path, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _checkpoint(tmp_path_factory.mktemp("clip"), "seemly-tiny-clip", TINY)


def _scene() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    masks = [np.zeros((60, 80), bool) for _ in range(3)]
    masks[0][5:30, 5:30] = True
    masks[1][20:58, 40:75] = True  # masks[2] stays empty: a grey crop, still scored
    return image, masks


# --- the installed package ----------------------------------------------------------------------------


def test_open_clip_is_the_pinned_release_on_the_shim() -> None:
    open_clip = _import_open_clip()
    assert open_clip.__version__ == OPEN_CLIP_VERSION
    import torchvision

    if tv.is_shim(torchvision):
        from open_clip import transform

        assert transform.CenterCrop is tv.CenterCrop and transform.Resize is tv.Resize


# --- the shim's transforms, against known values ------------------------------------------------------


def test_resize_shortest_edge_sizes_as_torchvision() -> None:
    landscape = Image.new("RGB", (300, 200))  # PIL: (width, height)
    assert tv.Resize(224)(landscape).size == (336, 224)
    portrait = Image.new("RGB", (100, 250))
    assert tv.Resize(224)(portrait).size == (224, 560)
    assert tv.Resize(224, max_size=400)(portrait).size == (160, 400)
    assert tv.Resize(224)(Image.new("RGB", (224, 500))) is not None
    tensor = torch.rand(3, 200, 300)
    assert tv.Resize(224)(tensor).shape == (3, 224, 336)
    assert torch.jit.script(tv.Resize(20))(torch.rand(3, 30, 40)).shape == (3, 20, 26)  # int(20*40/30)=26
    pil = Image.fromarray(np.arange(12 * 16, dtype=np.uint8).reshape(12, 16))
    bicubic = tv.Resize(6, interpolation=tv.InterpolationMode.BICUBIC)(pil)
    np.testing.assert_array_equal(np.array(bicubic), np.array(pil.resize((8, 6), Image.Resampling.BICUBIC)))


def test_center_crop_offsets_and_padding() -> None:
    array = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7)
    # top = round((6 - 3) / 2) = 2 (round half to even), left = round((7 - 3) / 2) = 2
    expected = array[2:5, 2:5]
    np.testing.assert_array_equal(np.array(tv.CenterCrop(3)(Image.fromarray(array))), expected)
    np.testing.assert_array_equal(tv.CenterCrop(3)(torch.from_numpy(array)[None])[0].numpy(), expected)
    np.testing.assert_array_equal(
        tv.center_crop(torch.from_numpy(array)[None], [2, 4])[0].numpy(), array[2:4, 2:6]
    )
    # larger than the image: zero padding, left/top get the smaller half, as torchvision
    small = np.array([[1, 2], [3, 4]], np.uint8)
    padded = np.zeros((4, 5), np.uint8)
    padded[1:3, 1:3] = small
    np.testing.assert_array_equal(np.array(tv.center_crop(Image.fromarray(small), [4, 5])), padded)
    np.testing.assert_array_equal(tv.center_crop(torch.from_numpy(small)[None], [4, 5])[0].numpy(), padded)
    assert tv.get_dimensions(Image.new("RGB", (5, 4))) == [3, 4, 5]
    assert tv.get_dimensions(torch.zeros(2, 3, 4, 5)) == [3, 4, 5]
    assert np.array(tv.pad(Image.new("L", (2, 2), 9), [1, 2], fill=7)).tolist() == [
        [7, 7, 7, 7],
        [7, 7, 7, 7],
        [7, 9, 9, 7],
        [7, 9, 9, 7],
        [7, 7, 7, 7],
        [7, 7, 7, 7],
    ]
    assert np.array(tv.crop(Image.fromarray(array), 1, 2, 2, 3)).tolist() == array[1:3, 2:5].tolist()


def test_frozen_batch_norm_equals_batch_norm_in_eval() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    frozen = tv.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped, as in torchvision
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(frozen(x), bn.eval()(x))


def test_training_augmentations_refuse_to_run() -> None:
    crop = tv.RandomResizedCrop(32, scale=(0.9, 1.0))
    with pytest.raises(NotImplementedError, match=r"RandomResizedCrop.*training augmentation"):
        crop(Image.new("RGB", (8, 8)))


def test_open_clip_preprocess_on_known_images(tiny: tuple[Path, Path]) -> None:
    config, weights = tiny
    scorer = ClipScorer(str(weights), model_config=config)
    mean = np.array(scorer.model.visual.preprocess_cfg["mean"], np.float32)
    std = np.array(scorer.model.visual.preprocess_cfg["std"], np.float32)
    # a uniform colour stays uniform through resize and crop: every pixel is (c / 255 - mean) / std
    flat = scorer.preprocess(Image.new("RGB", (50, 40), (200, 100, 50)))
    assert flat.shape == (3, 32, 32) and flat.dtype == torch.float32
    expected = (np.array([200, 100, 50], np.float32) / 255 - mean) / std
    np.testing.assert_allclose(flat.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    assert float(flat.std(dim=(1, 2)).max()) < 1e-5
    # a gradient: shorter side to 32 with PIL bicubic (40x50 -> 32x40), centre crop columns 4..36
    ramp = np.broadcast_to(np.arange(50, dtype=np.uint8)[None, :, None] * 5, (40, 50, 3)).copy()
    resized = np.asarray(Image.fromarray(ramp).resize((40, 32), Image.Resampling.BICUBIC), np.float32)
    reference = ((resized[:, 4:36] / 255 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(
        scorer.preprocess(Image.fromarray(ramp)).numpy(), reference, rtol=1e-5, atol=1e-6
    )


# --- ClipScorer on the tiny model ----------------------------------------------------------------------


def test_scorer_loads_from_a_path_and_file_uri_and_scores(tiny: tuple[Path, Path]) -> None:
    config, weights = tiny
    scorer = ClipScorer(str(weights), model_config=config)
    assert scorer.model_name == "seemly-tiny-clip" and scorer.version.startswith("clip-seemly-tiny-clip-")
    tokens = scorer.tokenizer(["a photo of a cat", "a photo of a background"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    with torch.no_grad():
        text = scorer.model.encode_text(tokens)
        image = scorer.model.encode_image(torch.stack([scorer.preprocess(Image.new("RGB", (40, 40)))]))
    assert text.shape == (2, 16) and image.shape == (1, 16) and text.dtype == image.dtype == torch.float32

    picture, masks = _scene()
    scores = scorer.score(picture, masks, ["cat", "dog"], "cat")
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))
    np.testing.assert_array_equal(
        scorer.score(picture, masks, ["cat", "dog"], "cat"), scores
    )  # deterministic
    # P(cat) + P(dog) + P(background) = 1 per proposal
    total = scores + scorer.score(picture, masks, ["cat", "dog"], "dog")
    assert np.all(total < 1)
    again = ClipScorer(weights.as_uri(), model_config=config)  # file:// URI, a fresh model: same numbers
    assert again.version == scorer.version
    np.testing.assert_allclose(again.score(picture, masks, ["cat", "dog"], "cat"), scores, rtol=1e-6)
    half = picture[::2, ::2]  # masks at full resolution on a downscaled image
    assert scorer.score(half, masks, ["cat"], "cat").shape == (3,)
    assert scorer.score(picture, [], ["cat"], "cat").shape == (0,)


def test_scorer_loads_from_s3(tiny: tuple[Path, Path], s3_bucket: Any, tmp_path: Path) -> None:
    config, weights = tiny
    uri = s3_bucket.put("models/tiny-clip.pt", weights.read_bytes())
    scorer = ClipScorer(uri, model_config=config, storage=s3_bucket.storage, cache_dir=tmp_path)
    local = ClipScorer(str(weights), model_config=config)
    picture, masks = _scene()
    np.testing.assert_allclose(
        scorer.score(picture, masks, ["cat"], "cat"), local.score(picture, masks, ["cat"], "cat"), rtol=1e-6
    )
    with pytest.raises(CheckpointNotFoundError, match="no such S3 object"):
        ClipScorer(
            s3_bucket.uri("models/missing.pt"),
            model_config=config,
            storage=s3_bucket.storage,
            cache_dir=tmp_path,
        )


def test_missing_or_wrong_checkpoints_say_so(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    config, weights = tiny
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        ClipScorer(str(tmp_path / "nowhere.pt"), model_config=config)
    _, other = _checkpoint(tmp_path, "seemly-other-clip", OTHER)
    with pytest.raises(CheckpointArchitectureError, match=r"does not fit the open_clip seemly-tiny-clip"):
        ClipScorer(str(other), model_config=config)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=r"not a .*torch checkpoint"):
        ClipScorer(str(tmp_path / "garbage.pt"), model_config=config)
    with pytest.raises(ClipUnavailableError, match="unknown CLIP architecture 'no-such-clip'"):
        ClipScorer(str(weights), model_name="no-such-clip")
    with pytest.raises(ClipUnavailableError, match=r"missing \['vision_cfg', 'text_cfg'\]"):
        ClipScorer(str(weights), model_config=_config(tmp_path, "half", {"embed_dim": 4}))
    with pytest.raises(ClipUnavailableError, match="cannot read it"):
        ClipScorer(str(weights), model_config=tmp_path / "absent.json")
    timm = {**TINY, "vision_cfg": {"timm_model_name": "convnext_tiny", "image_size": 32}}
    with pytest.raises(ClipUnavailableError, match="needs timm"):
        ClipScorer(str(weights), model_config=_config(tmp_path, "seemly-timm-clip", timm))


def test_without_open_clip_the_error_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ClipUnavailableError, match=r"--no-deps open_clip_torch==3\.3\.0"):
        ClipScorer(str(tmp_path / "clip.pt"))


# --- wired into text prompts and the benchmark CLI --------------------------------------------------------


def test_semantic_engine_and_bench_take_a_clip_checkpoint(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from seemly.bench.interactive import _engines
    from seemly.engines.semantic import create_semantic_engine

    config, weights = tiny
    engine = create_semantic_engine(
        "classic", ["cat", "dog"], clip=weights.as_uri(), clip_config=str(config), embedder=False
    )
    assert isinstance(engine.clip, ClipScorer) and engine.clip.model_name == "seemly-tiny-clip"
    engines = _engines(
        ["classic", "semantic"],
        None,
        {"clip": str(weights), "clip_model": "ViT-B-32", "clip_config": str(config)},
    )
    assert isinstance(engines["semantic"].clip, ClipScorer)
    assert not hasattr(engines["classic"], "clip")


def test_bench_cli_reports_a_bad_clip_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from seemly import cli

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    args = ["bench", "interactive", "--dataset", str(tmp_path), "--engine", "semantic"]
    assert cli.main([*args, "--clip-checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["bench", "interactive", "--dataset", str(tmp_path), "--clip-checkpoint", "x.pt"]) == 2
    assert "add it to --engine" in capsys.readouterr().err


# --- the backend: SEEMLY_CLIP_CHECKPOINT answers text prompts -----------------------------------------


def test_backend_answers_text_prompts_with_clip_weights(
    tiny: tuple[Path, Path], postgres_db: Any, postgres_url: str, tmp_path: Path
) -> None:
    from tests.backend_support import interactive_body, make_backend, make_scene, save, textarea

    config_path, weights = tiny
    images = tmp_path / "images"
    images.mkdir()
    plain = make_backend(postgres_db, postgres_url, images)
    scene = make_scene(3)
    uri = save(scene, images, "scene.png")
    try:  # no label model and no CLIP weights: the text cannot be followed, and the answer says so
        refused = plain.post("/predict", interactive_body(1, uri, [textarea("dog")]))
        assert refused.status_code == 422 and "looks like" not in refused.json["error"]
    finally:
        plain.backend.history.close()

    backend = make_backend(
        postgres_db, postgres_url, images, clip_checkpoint=str(weights), clip_config=str(config_path)
    )
    try:
        assert isinstance(backend.backend.predictor.semantic.clip, ClipScorer)
        response = backend.post("/predict", interactive_body(2, uri, [textarea("dog")]))
        # The proposals were scored by image-text similarity: with random tiny weights nothing
        # clears the threshold, and the answer is CLIP's own (real weights find the dog).
        assert response.status_code == 422, response.json
        assert "no region of this image looks like 'dog'" in response.json["error"]
    finally:
        backend.backend.history.close()


def test_backend_refuses_to_start_with_a_bad_clip_checkpoint(
    postgres_db: Any, postgres_url: str, tmp_path: Path
) -> None:
    from tests.backend_support import make_backend

    with pytest.raises(CheckpointNotFoundError):
        make_backend(postgres_db, postgres_url, tmp_path, clip_checkpoint=str(tmp_path / "missing.pt"))

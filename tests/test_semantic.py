"""Text and combined prompts through the SemanticEngine layer (classic as the base engine)."""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import pytest

from seemly.engines.base import Engine, UnsupportedPromptError, create_engine
from seemly.engines.label_model import LabelledImage, LabelModel, fit_label_model
from seemly.engines.semantic import NothingFoundError, SemanticEngine, create_semantic_engine
from seemly.prompts import PromptRound
from seemly.text_labels import TextLabelError, TextLabelMatcher
from tests.semantic_scenes import iou, make_scene
from tests.test_text_labels import FakeEmbedder


@pytest.fixture(scope="module")
def classic() -> Engine:
    return create_engine("classic")


@pytest.fixture(scope="module")
def label_model(classic) -> LabelModel:
    # a few labelled images: the project has annotated some apples (red discs) and boxes (blue squares)
    scenes = [make_scene(seed, ["apple", "box", "apple"]) for seed in range(3)]
    return fit_label_model([LabelledImage(s.image, s.objects) for s in scenes], classic)


@pytest.fixture(scope="module")
def engine(classic, label_model) -> SemanticEngine:
    matcher = TextLabelMatcher(["apple", "box"], embedder=FakeEmbedder({"fruit": "apple", "crate": "box"}))
    return SemanticEngine(classic, label_model, matcher)


def text(value: str, *visual: dict) -> PromptRound:
    return PromptRound(prompts=[*visual, {"kind": "text", "text": value}])


def embed(engine: Engine, image: np.ndarray):
    return engine.embed(image, hashlib.sha256(image.tobytes()).hexdigest())


def box_around(mask: np.ndarray, margin: int = 6) -> dict:
    ys, xs = np.nonzero(mask)
    return {
        "kind": "box",
        "x0": float(max(0, xs.min() - margin)),
        "y0": float(max(0, ys.min() - margin)),
        "x1": float(xs.max() + 1 + margin),
        "y1": float(ys.max() + 1 + margin),
    }


def test_keeps_the_base_engines_identity(engine, classic) -> None:
    assert engine.name == "classic" and engine.model_version == classic.model_version


@pytest.mark.parametrize("seed", [10, 11])
def test_text_finds_the_labelled_kind_in_a_new_image(engine, seed) -> None:
    scene = make_scene(seed, ["box", "apple"])
    state = embed(engine, scene.image)
    apples = engine.segment(state, text("apples"))
    assert apples[0].label == "apple"
    assert iou(apples[0].mask.data, scene.union("apple")) > 0.9
    boxes = engine.segment(state, text("box"))
    assert iou(boxes[0].mask.data, scene.union("box")) > 0.9


def test_synonym_through_the_text_model(engine) -> None:
    scene = make_scene(12, ["apple", "box"])
    segments = engine.segment(embed(engine, scene.image), text("fruit"))
    assert segments[0].label == "apple" and iou(segments[0].mask.data, scene.union("apple")) > 0.9


def test_every_instance_is_answered(engine) -> None:
    scene = make_scene(13, ["apple", "box", "apple"])
    segments = engine.find(embed(engine, scene.image), "apple")
    assert len(segments) >= 2
    found = [max(iou(s.mask.data, m) for s in segments[:2]) for m in scene.masks("apple")]
    assert min(found) > 0.9


def test_combined_text_and_box_restrict_each_other(engine, classic) -> None:
    scene = make_scene(21, ["box", "apple"])
    state = embed(engine, scene.image)
    both = box_around(scene.union("apple") | scene.union("box"))
    alone = classic.segment(state, PromptRound(prompts=[both]))[0]
    # the box alone is ambiguous: one answer, which cannot be both objects
    assert min(iou(alone.mask.data, scene.union(k)) for k in ("apple", "box")) < 0.5
    for word in ("apple", "box"):
        segments = engine.segment(state, text(word, both))
        assert segments[0].label == word
        assert iou(segments[0].mask.data, scene.union(word)) > 0.9


def test_combined_text_and_box_pick_the_instance_in_the_box(engine) -> None:
    scene = make_scene(13, ["apple", "box", "apple"])
    _first, second = scene.masks("apple")
    segments = engine.segment(embed(engine, scene.image), text("apple", box_around(second, 10)))
    assert iou(segments[0].mask.data, second) > 0.9


def test_combined_text_and_click(engine) -> None:
    scene = make_scene(22, ["box", "apple"])
    ys, xs = np.nonzero(scene.union("apple"))
    click = {"kind": "click", "x": float(xs.mean()), "y": float(ys.mean())}
    segments = engine.segment(embed(engine, scene.image), text("apple", click))
    assert iou(segments[0].mask.data, scene.union("apple")) > 0.9


def test_visual_prompts_alone_go_to_the_base_engine(engine, classic) -> None:
    scene = make_scene(23, ["apple"])
    state = embed(engine, scene.image)
    ys, xs = np.nonzero(scene.union("apple"))
    prompt = PromptRound(prompts=[{"kind": "click", "x": float(xs.mean()), "y": float(ys.mean())}])
    ours, theirs = engine.segment(state, prompt), classic.segment(state, prompt)
    assert [s.mask for s in ours] == [s.mask for s in theirs]


def test_unknown_text_lists_the_labels(engine) -> None:
    scene = make_scene(24, ["apple"])
    with pytest.raises(TextLabelError, match=r"'zebra' matches none of this project's labels: apple, box"):
        engine.segment(embed(engine, scene.image), text("zebra"))


def test_nothing_found_is_a_clear_error(engine) -> None:
    scene = make_scene(25, ["apple", "apple"])
    with pytest.raises(NothingFoundError, match="no region of this image looks like 'box'"):
        engine.segment(embed(engine, scene.image), text("boxes"))


def test_label_without_a_label_model(classic) -> None:
    scene = make_scene(26, ["apple"])
    bare = SemanticEngine(classic, None, labels=["apple", "box"], embedder=False)
    state = bare.embed(scene.image, "x" * 64)
    with pytest.raises(UnsupportedPromptError) as caught:
        bare.segment(state, text("apples"))
    message = str(caught.value)
    assert "classic engine" in message and "text" in message and "no label model" in message


def test_label_the_model_never_saw(classic, label_model) -> None:
    scene = make_scene(27, ["apple"])
    engine = SemanticEngine(classic, label_model, labels=["apple", "box", "leaf"], embedder=False)
    with pytest.raises(UnsupportedPromptError, match="knows only apple, box"):
        engine.segment(embed(engine, scene.image), text("leaf"))


def test_classify_everything(engine) -> None:
    scene = make_scene(28, ["box", "apple"])
    segments = engine.classify_everything(embed(engine, scene.image))
    labelled = {s.label: s for s in segments if s.label}
    assert set(labelled) == {"apple", "box"}
    assert iou(labelled["apple"].mask.data, scene.union("apple")) > 0.9


def test_factory_and_registry(classic, label_model, tmp_path) -> None:
    from seemly.storage import Storage, path_to_uri

    storage = Storage(file_roots=[tmp_path])
    uri = label_model.save(path_to_uri(tmp_path / "m.npz"), storage)
    made = create_semantic_engine(classic, ["apple", "box"], uri, storage=storage, embedder=False)
    assert made.label_model is not None and made.label_model.version == label_model.version
    registered = create_engine("semantic", base="classic", labels=["apple"], embedder=False)
    assert isinstance(registered, SemanticEngine) and registered.labels == ["apple"]
    wrapped = SemanticEngine(made, None, embedder=False)  # wrapping a semantic engine wraps its base
    assert wrapped.base is classic


def test_through_a_segmenter_client(classic, label_model) -> None:
    """The backend's path: the in-process segmenter (with its embed cache) under the semantic layer."""
    from backend.segmenter import ImageHandle, InProcessSegmenter
    from seemly.images import DecodedImage

    scene = make_scene(29, ["box", "apple"])
    sha = hashlib.sha256(scene.image.tobytes()).hexdigest()
    loads = []

    def load() -> DecodedImage:
        loads.append(1)
        return DecodedImage(array=scene.image, sha256=sha, width=320, height=240, format="PNG")

    handle = ImageHandle(sha, 320, 240, "file:///x.png", load)
    client = InProcessSegmenter(classic)
    engine = SemanticEngine(classic, label_model, labels=["apple", "box"], embedder=False)
    segments = engine.segment_with_client(client, handle, text("apple"))
    assert iou(segments[0].mask.data, scene.union("apple")) > 0.9
    again = engine.segment_with_client(client, handle, text("box", box_around(scene.union("box"))))
    assert iou(again[0].mask.data, scene.union("box")) > 0.9
    assert len(loads) == 2  # one embed, one copy of the pixels for the region features; then cached


# --- through the Label Studio backend -------------------------------------------------------------------


@pytest.fixture
def backend_app(postgres_db, postgres_url, tmp_path):
    from tests.backend_support import backend_app_for

    yield from backend_app_for(postgres_db, postgres_url, tmp_path)


def test_backend_text_prompt_uses_the_projects_label_model(backend_app, classic) -> None:
    """A project with a trained label model answers a text-only round; the model is found via the
    project's settings, as ``seemly labels train`` records it."""
    import io

    from PIL import Image as PILImage

    from backend.db import ensure_project
    from seemly.engines.label_model import record_label_model
    from seemly.storage import path_to_uri
    from tests.backend_support import (
        PROJECT_ID,
        brush_mask,
        interactive_body,
        keypoint,
        only_brush,
        save,
        textarea,
    )
    from tests.backend_support import make_scene as backend_scene

    def pixels(scene) -> np.ndarray:
        return np.asarray(PILImage.open(io.BytesIO(scene.png)).convert("RGB"))

    training = [backend_scene(seed, layout=layout) for seed, layout in ((100, "left"), (101, "right"))]
    model = fit_label_model(
        [LabelledImage(pixels(s), [(k, np.asarray(m.data)) for k, m in s.truth.items()]) for s in training],
        classic,
    )
    uri = path_to_uri(backend_app.images / "label-model.npz")
    model.save(uri, backend_app.backend.storage)
    with backend_app.db.begin() as conn:
        project_id = ensure_project(conn, PROJECT_ID)
    record_label_model(backend_app.db, project_id, uri, model)

    scene = backend_scene(102, layout="right")
    image_uri = save(scene, backend_app.images, "t.png")
    response = backend_app.post("/predict", interactive_body(1, image_uri, [textarea("cats")]))
    assert response.status_code == 200, response.json
    brush = only_brush(response.json["results"][0])
    assert brush["value"]["brushlabels"] == ["cat"]
    assert brush_mask(brush).iou(scene.truth["cat"]) > 0.85

    # unknown text: the annotator learns which labels exist
    response = backend_app.post("/predict", interactive_body(2, image_uri, [textarea("zebras")]))
    assert response.status_code == 422 and "cat, dog" in response.json["error"]

    # text + a click on the other object: the text says what, so the click's object must be a dog
    dx, dy = scene.pct("dog")
    body = interactive_body(3, image_uri, [textarea("dog"), keypoint(scene, dx, dy, label="cat")])
    response = backend_app.post("/predict", body)
    assert response.status_code == 200, response.json
    brush = only_brush(response.json["results"][0])
    assert brush["value"]["brushlabels"] == ["dog"] and brush_mask(brush).iou(scene.truth["dog"]) > 0.85


# --- the open-vocabulary (CLIP) path -------------------------------------------------------------------


def test_clip_scorer_without_open_clip_says_so(tmp_path, monkeypatch) -> None:
    import sys

    from seemly.engines.clip_scorer import ClipScorer, ClipUnavailableError

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ClipUnavailableError, match=r"open-clip-torch.*torchvision"):
        ClipScorer(str(tmp_path / "clip.pt"))


class _FakeOpenClip:
    """Stands in for open_clip: 'embeddings' are mean colours, so 'apple' means red, 'box' blue."""

    COLOURS: ClassVar[dict[str, tuple[float, float, float]]] = {
        "apple": (1.0, 0.0, 0.0),
        "box": (0.0, 0.0, 1.0),
        "background": (0.5, 0.5, 0.5),
    }

    def create_model_and_transforms(self, name, pretrained, device):
        import torch

        assert name == "ViT-B-32" and pretrained.endswith("clip.pt")

        class Model(torch.nn.Module):
            logit_scale = torch.tensor(float(np.log(100.0)))

            def encode_image(self, batch):
                return batch

            def encode_text(self, tokens):
                return tokens

        def preprocess(pil):
            array = np.asarray(pil, np.float32)
            keep = (array != 127).any(axis=2)
            mean = array[keep].mean(axis=0) if keep.any() else np.zeros(3)
            return torch.tensor(mean / 255.0 + 1e-3, dtype=torch.float32)

        return Model(), None, preprocess

    def get_tokenizer(self, name):
        import torch

        def tokenize(prompts):
            return torch.tensor([self.COLOURS[p.split()[-1]] for p in prompts], dtype=torch.float32) + 1e-3

        return tokenize


def test_clip_scorer_drives_text_prompts(classic, tmp_path) -> None:
    from seemly.engines.clip_scorer import ClipScorer

    (tmp_path / "clip.pt").write_bytes(b"weights")
    scorer = ClipScorer(str(tmp_path / "clip.pt"), open_clip=_FakeOpenClip())
    engine = SemanticEngine(classic, None, clip=scorer, labels=["apple", "box"], embedder=False)
    scene = make_scene(30, ["box", "apple"])
    state = embed(engine, scene.image)
    assert iou(engine.segment(state, text("apple"))[0].mask.data, scene.union("apple")) > 0.9
    assert iou(engine.segment(state, text("boxes"))[0].mask.data, scene.union("box")) > 0.9

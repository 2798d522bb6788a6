"""A minimal ``torchvision`` stand-in for SAM, SAM 2 and open_clip, installed only when torchvision is missing.

Why
---
seemly pins torch (2.13.0, CPU wheel by default) and the torchvision wheels on PyPI are each built
against one exact torch release: a mismatched one fails at import, and a matching one would drag in
another multi-GB torch. Yet the official ``segment-anything``, ``sam2`` and ``open_clip_torch``
packages import only a handful of torchvision functions:

=====================================================  ==========================================
``torchvision.ops.boxes.batched_nms``, ``box_area``     the automatic ("everything") mask generators
``torchvision.transforms.functional.resize``,           ``segment_anything.utils.transforms``
``to_pil_image``                                        (ResizeLongestSide on numpy images)
``torchvision.transforms.Resize``, ``Normalize``,       ``sam2.utils.transforms.SAM2Transforms``
``ToTensor``                                            (scripted with ``torch.jit.script``)
``Compose``, ``Resize(int)``, ``CenterCrop``,           ``open_clip.transform`` (inference
``functional.get_dimensions``, ``pad``, ``crop``,       preprocessing: shortest-edge bicubic
``center_crop``, ``to_tensor``                          resize, centre crop or pad, normalise)
``torchvision.ops.misc.FrozenBatchNorm2d``              ``open_clip.utils`` (frozen ResNet towers)
=====================================================  ==========================================

:func:`ensure_torchvision` puts small, pure-torch/PIL implementations of exactly these (same
signatures, same numerics: PIL resampling for PIL images, antialiased ``F.interpolate`` for tensors,
torchvision's output-size and crop-offset rounding, greedy NMS with torchvision's IoU and its
"suppress when IoU > threshold" rule) into ``sys.modules`` under the ``torchvision`` names.
``open_clip.transform`` also imports the training augmentations ``RandomResizedCrop``,
``ColorJitter`` and ``Grayscale``: the shim has them only as names that refuse to run (seemly uses
open_clip for inference; train CLIP where the real torchvision is installed).

Rules
-----
* A working real torchvision always wins: the shim is installed only when ``import torchvision``
  finds nothing. If a torchvision is installed but fails to import (built for another torch), the
  failure is logged as a warning and the shim is used instead.
* The shim is installed lazily, by the SAM / SAM 2 engines only, never at ``import seemly``.
* Anything the shim does not provide fails loudly: ``from torchvision.transforms import Compose``
  raises ``ImportError`` naming this module, ``import torchvision.models`` raises
  ``ModuleNotFoundError``. Install the real torchvision for other uses.
* ``torchvision.__seemly_shim__`` is ``True`` on the shim (see :func:`is_shim`).
* ``transformers`` must not see it (it takes an importable torchvision for the whole library):
  code that loads a transformers model does so under :func:`shim_hidden`.

This module deliberately has no ``from __future__ import annotations``: ``sam2`` compiles the
transforms with ``torch.jit.script``, which reads their annotations.
"""

import contextlib
import enum
import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SHIM_VERSION = "0.0.0+seemly.shim"
_LOCK = threading.Lock()
_MODULE_NAMES = (
    "torchvision",
    "torchvision.ops",
    "torchvision.ops.boxes",
    "torchvision.ops.misc",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)


# --- torchvision.ops ---------------------------------------------------------------------------------


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(N, 4)`` boxes in ``(x0, y0, x1, y1)`` format (no +1: continuous coordinates)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x1 - x0) * (y1 - y0)
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        width = np.clip(np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]), 0, None)
        height = np.clip(np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]), 0, None)
        inter = width * height
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]  # NaN (empty boxes) never suppresses, as in torchvision
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, highest score first.

    Same contract as ``torchvision.ops.nms``: a box is dropped when its IoU with a kept,
    higher-scoring box is strictly greater than ``iou_threshold``. Ties keep the earlier index.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    keep = _nms_numpy(
        boxes.detach().to("cpu", torch.float64).numpy(),
        scores.detach().to("cpu", torch.float64).numpy(),
        float(iou_threshold),
    )
    return torch.from_numpy(keep).to(boxes.device)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per category ``idxs``; same contract as ``torchvision.ops.batched_nms``."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # torchvision's coordinate trick: shift each category far away so that boxes of different
    # categories never overlap, then run one NMS.
    boxes64 = boxes.detach().to(torch.float64)
    max_coordinate = boxes64.max()
    offsets = idxs.detach().to(boxes64) * (max_coordinate + 1)
    return nms(boxes64 + offsets[:, None], scores, iou_threshold)


class FrozenBatchNorm2d(nn.Module):
    """``torchvision.ops.misc.FrozenBatchNorm2d``: batch norm with fixed statistics and affine terms.

    Same buffers (``weight``, ``bias``, ``running_mean``, ``running_var``) and the same arithmetic,
    ``x * weight / sqrt(running_var + eps) + bias - running_mean * scale``, as torchvision.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # as torchvision: BatchNorm2d weights load
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# --- torchvision.transforms -------------------------------------------------------------------------


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _pil_filter(mode: InterpolationMode) -> Any:
    from PIL import Image

    return {
        InterpolationMode.NEAREST: Image.Resampling.NEAREST,
        InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
        InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
        InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
        InterpolationMode.BOX: Image.Resampling.BOX,
        InterpolationMode.HAMMING: Image.Resampling.HAMMING,
        InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    }[mode]


def _output_size(height: int, width: int, size: int | Sequence[int], max_size: int | None) -> tuple[int, int]:
    if isinstance(size, int) or (isinstance(size, Sequence) and len(size) == 1):
        target = int(size) if isinstance(size, int) else int(size[0])
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = target, int(target * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        return (new_short, new_long) if height <= width else (new_long, new_short)
    if len(size) != 2:
        raise ValueError(f"size must be an int or a sequence of one or two ints, got {size!r}")
    return int(size[0]), int(size[1])


def _tensor_resize(img: Tensor, size: list[int], mode: str, antialias: bool) -> Tensor:
    squeeze = img.dim() == 3
    batch = img.unsqueeze(0) if squeeze else img
    dtype = batch.dtype
    work = batch if batch.is_floating_point() else batch.to(torch.float32)
    if mode in ("bilinear", "bicubic"):
        out = F.interpolate(work, size=size, mode=mode, align_corners=False, antialias=antialias)
    else:
        out = F.interpolate(work, size=size, mode=mode)
    if not dtype.is_floating_point:
        out = out.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else out.round().to(dtype)
    return out.squeeze(0) if squeeze else out


def resize(
    img: Any,
    size: int | Sequence[int],
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    max_size: int | None = None,
    antialias: bool | None = True,
) -> Any:
    """``torchvision.transforms.functional.resize`` for PIL images and ``(..., C, H, W)`` tensors."""
    if isinstance(img, Tensor):
        height, width = int(img.shape[-2]), int(img.shape[-1])
        out_h, out_w = _output_size(height, width, size, max_size)
        mode = interpolation.value if isinstance(interpolation, InterpolationMode) else str(interpolation)
        return _tensor_resize(img, [out_h, out_w], mode, bool(antialias))
    width, height = img.size  # a PIL image
    out_h, out_w = _output_size(height, width, size, max_size)
    if (out_h, out_w) == (height, width):
        return img
    return img.resize((out_w, out_h), _pil_filter(interpolation))


def to_pil_image(pic: Any, mode: str | None = None) -> Any:
    """A PIL image from an ``H x W (x C)`` numpy array or a ``C x H x W`` tensor (floats in [0, 1])."""
    from PIL import Image

    if isinstance(pic, Tensor):
        array = pic.detach().cpu()
        if array.is_floating_point():
            array = (array * 255).round().clamp(0, 255).to(torch.uint8)
        array = array.numpy()
        if array.ndim == 3:
            array = np.transpose(array, (1, 2, 0))
    else:
        array = np.asarray(pic)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"pic should be 2 or 3 dimensional, got {array.ndim} dimensions")
    return (
        Image.fromarray(np.ascontiguousarray(array), mode=mode)
        if mode
        else Image.fromarray(np.ascontiguousarray(array))
    )


def to_tensor(pic: Any) -> Tensor:
    """``C x H x W`` float tensor in [0, 1] from a PIL image or ``H x W (x C)`` uint8 array."""
    array = np.asarray(pic)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose((2, 0, 1))))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div(255)
    return tensor


def normalize(tensor: Tensor, mean: list[float], std: list[float], inplace: bool = False) -> Tensor:
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if inplace:
        return tensor.sub_(mean_t).div_(std_t)
    return (tensor - mean_t) / std_t


def get_dimensions(img: Any) -> list[int]:
    """``[channels, height, width]`` of a PIL image or a ``(..., C, H, W)`` tensor."""
    if isinstance(img, Tensor):
        channels = 1 if img.dim() == 2 else int(img.shape[-3])
        return [channels, int(img.shape[-2]), int(img.shape[-1])]
    width, height = img.size
    return [len(img.getbands()), height, width]


def crop(img: Any, top: int, left: int, height: int, width: int) -> Any:
    """The ``height x width`` region at ``(top, left)``; outside the image is zero (as torchvision)."""
    if not isinstance(img, Tensor):
        return img.crop((left, top, left + width, top + height))  # PIL fills outside with zeros too
    _, h, w = get_dimensions(img)
    right, bottom = left + width, top + height
    if left < 0 or top < 0 or right > w or bottom > h:
        padding = [max(-left, 0), max(-top, 0), max(right - w, 0), max(bottom - h, 0)]
        img = pad(img, padding)
        top, left = max(top, 0), max(left, 0)
    return img[..., top : top + height, left : left + width]


def pad(img: Any, padding: int | Sequence[int], fill: int | float | Sequence[int] = 0) -> Any:
    """Constant padding; ``padding`` is one int, ``[lr, tb]`` or ``[left, top, right, bottom]``."""
    values = [padding] if isinstance(padding, int) else [int(v) for v in padding]
    if len(values) == 1:
        left = top = right = bottom = values[0]
    elif len(values) == 2:
        left = right = values[0]
        top = bottom = values[1]
    elif len(values) == 4:
        left, top, right, bottom = values
    else:
        raise ValueError(f"padding must be an int or 1, 2 or 4 ints, got {padding!r}")
    if isinstance(img, Tensor):
        if not isinstance(fill, int | float):
            raise NotImplementedError("seemly's torchvision shim pads tensors with one constant value only")
        return F.pad(img, [left, right, top, bottom], mode="constant", value=float(fill))
    from PIL import Image

    width, height = img.size
    colour = fill if isinstance(fill, int | float) else tuple(fill)
    if isinstance(colour, int | float) and len(img.getbands()) > 1:
        colour = (int(colour),) * len(img.getbands())
    out = Image.new(img.mode, (width + left + right, height + top + bottom), colour)  # type: ignore[arg-type]
    out.paste(img, (left, top))
    return out


def center_crop(img: Any, output_size: int | Sequence[int]) -> Any:
    """The centred ``output_size`` crop, padded with zeros first when the image is smaller."""
    if isinstance(output_size, int):
        crop_h = crop_w = int(output_size)
    elif len(output_size) == 1:
        crop_h = crop_w = int(output_size[0])
    else:
        crop_h, crop_w = int(output_size[0]), int(output_size[1])
    _, height, width = get_dimensions(img)
    if crop_w > width or crop_h > height:
        padding = [
            (crop_w - width) // 2 if crop_w > width else 0,
            (crop_h - height) // 2 if crop_h > height else 0,
            (crop_w - width + 1) // 2 if crop_w > width else 0,
            (crop_h - height + 1) // 2 if crop_h > height else 0,
        ]
        img = pad(img, padding)
        _, height, width = get_dimensions(img)
        if crop_w == width and crop_h == height:
            return img
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return crop(img, top, left, crop_h, crop_w)


class Compose:
    """``torchvision.transforms.Compose``: apply the transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for transform in self.transforms:
            img = transform(img)
        return img

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"Compose({inner}\n)"


class CenterCrop(nn.Module):
    """``torchvision.transforms.CenterCrop`` (see :func:`center_crop`)."""

    def __init__(self, size: Any) -> None:
        super().__init__()
        if isinstance(size, int):
            self.size = (int(size), int(size))
        elif len(size) == 1:
            self.size = (int(size[0]), int(size[0]))
        else:
            self.size = (int(size[0]), int(size[1]))

    def forward(self, img: Any) -> Any:
        return center_crop(img, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class _TrainingOnly:
    """A training augmentation open_clip imports; the shim does not implement it (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __call__(self, img: Any) -> Any:
        raise NotImplementedError(
            f"torchvision.transforms.{type(self).__name__} is a training augmentation that seemly's "
            "torchvision shim (seemly.engines.torchvision_compat) does not implement; seemly runs "
            "open_clip for inference only. Install a torchvision built for this torch to train"
        )


class RandomResizedCrop(_TrainingOnly):
    pass


class ColorJitter(_TrainingOnly):
    pass


class Grayscale(_TrainingOnly):
    pass


class ToTensor:
    """``torchvision.transforms.ToTensor``: PIL / uint8 array to a float tensor in [0, 1]."""

    def __call__(self, pic: Any) -> Tensor:
        return to_tensor(pic)

    def __repr__(self) -> str:
        return "ToTensor()"


def _shortest_edge_size(height: int, width: int, target: int, max_size: int | None) -> list[int]:
    """torchvision's ``Resize(int)`` output ``[height, width]``: the shorter side becomes ``target``."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = target, int(target * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    if height <= width:
        return [new_short, new_long]
    return [new_long, new_short]


class Resize(nn.Module):
    """``torchvision.transforms.Resize``: ``(height, width)`` or, for an int, the shorter side.

    Tensors are resized with ``F.interpolate`` (scriptable: SAM 2 compiles it); PIL images with PIL's
    own filter, as torchvision does.
    """

    size: list[int]
    max_size: int | None
    mode: str
    antialias: bool

    def __init__(
        self,
        size: Any,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        max_size: Any = None,
        antialias: Any = True,
    ) -> None:
        super().__init__()
        sizes = [int(size)] if isinstance(size, int) else [int(v) for v in size]
        if len(sizes) not in (1, 2):
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        if max_size is not None and len(sizes) != 1:
            raise ValueError("max_size is only allowed when size is a single int")
        self.size = sizes
        self.max_size = None if max_size is None else int(max_size)
        self.interpolation = (
            interpolation
            if isinstance(interpolation, InterpolationMode)
            else InterpolationMode(interpolation)
        )
        self.mode = self.interpolation.value
        self.antialias = bool(antialias) if antialias is not None else True

    @torch.jit.unused
    def _resize_pil(self, img: Any) -> Any:
        return resize(img, self.size, self.interpolation, self.max_size, self.antialias)

    def forward(self, img: Tensor) -> Tensor:
        if not isinstance(img, Tensor):  # a PIL image (never true, so never compiled, when scripted)
            return self._resize_pil(img)
        squeeze = img.dim() == 3
        batch = img.unsqueeze(0) if squeeze else img
        size = self.size
        if len(size) == 1:
            size = _shortest_edge_size(int(batch.shape[-2]), int(batch.shape[-1]), size[0], self.max_size)
        if self.mode == "bilinear" or self.mode == "bicubic":
            out = F.interpolate(
                batch, size=size, mode=self.mode, align_corners=False, antialias=self.antialias
            )
        else:
            out = F.interpolate(batch, size=size, mode=self.mode)
        if squeeze:
            out = out.squeeze(0)
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.mode}, max_size={self.max_size}, antialias={self.antialias}"


class Normalize(nn.Module):
    """``torchvision.transforms.Normalize`` (scriptable)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        super().__init__()
        self.mean: list[float] = [float(v) for v in mean]
        self.std: list[float] = [float(v) for v in std]
        self.inplace: bool = inplace

    def forward(self, tensor: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        if self.inplace:
            return tensor.sub_(mean).div_(std)
        return (tensor - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


# --- installation ---------------------------------------------------------------------------------


def _missing(module_name: str, provided: Sequence[str]) -> Any:
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"{module_name}.{name} is not available: torchvision is not installed and seemly's minimal "
            f"shim (seemly.engines.torchvision_compat) only provides {', '.join(provided) or 'submodules'}; "
            "install a torchvision built for this torch to use it"
        )

    return __getattr__


def _module(name: str, attributes: dict[str, Any], package: bool) -> types.ModuleType:
    module = types.ModuleType(name, f"seemly's minimal stand-in for {name} (torchvision is not installed)")
    module.__spec__ = importlib.machinery.ModuleSpec(
        name, loader=None, origin="seemly-shim", is_package=package
    )
    if package:
        module.__path__ = []  # a package: unknown submodules raise ModuleNotFoundError
    module.__seemly_shim__ = True  # type: ignore[attr-defined]
    for key, value in attributes.items():
        setattr(module, key, value)
    provided = [key for key in attributes if not key.startswith("_")]
    module.__getattr__ = _missing(name, provided)  # type: ignore[method-assign]
    return module


def _build() -> dict[str, types.ModuleType]:
    boxes = _module(
        "torchvision.ops.boxes", {"nms": nms, "batched_nms": batched_nms, "box_area": box_area}, False
    )
    misc = _module("torchvision.ops.misc", {"FrozenBatchNorm2d": FrozenBatchNorm2d}, False)
    ops = _module(
        "torchvision.ops",
        {"boxes": boxes, "misc": misc, "nms": nms, "batched_nms": batched_nms, "box_area": box_area},
        True,
    )
    functional = _module(
        "torchvision.transforms.functional",
        {
            "resize": resize,
            "to_pil_image": to_pil_image,
            "to_tensor": to_tensor,
            "normalize": normalize,
            "get_dimensions": get_dimensions,
            "crop": crop,
            "pad": pad,
            "center_crop": center_crop,
            "InterpolationMode": InterpolationMode,
        },
        False,
    )
    transforms = _module(
        "torchvision.transforms",
        {
            "functional": functional,
            "Compose": Compose,
            "Resize": Resize,
            "CenterCrop": CenterCrop,
            "Normalize": Normalize,
            "ToTensor": ToTensor,
            "InterpolationMode": InterpolationMode,
            "RandomResizedCrop": RandomResizedCrop,
            "ColorJitter": ColorJitter,
            "Grayscale": Grayscale,
        },
        True,
    )
    root = _module("torchvision", {"ops": ops, "transforms": transforms, "__version__": SHIM_VERSION}, True)
    return {
        "torchvision": root,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
        "torchvision.ops.misc": misc,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


def is_shim(module: Any = None) -> bool:
    """Whether ``module`` (default: the imported ``torchvision``, if any) is this shim."""
    module = module if module is not None else sys.modules.get("torchvision")
    return bool(getattr(module, "__seemly_shim__", False))


@contextlib.contextmanager
def shim_hidden() -> Iterator[None]:
    """Within the block, ``torchvision`` is absent again (if the shim is what is there).

    For code that must not mistake the shim for torchvision: ``transformers`` (sentence-transformers'
    backbone) treats an importable ``torchvision`` as the whole library and imports ``torchvision.io``
    and more, which the shim does not have. Holds the shim's lock, so no engine installs the shim
    meanwhile; the same module objects are put back afterwards (SAM's imports keep working).
    """
    with _LOCK:
        saved = (
            {n: m for n, m in sys.modules.items() if n == "torchvision" or n.startswith("torchvision.")}
            if is_shim()
            else {}
        )
        for name in saved:
            del sys.modules[name]
        try:
            yield
        finally:
            sys.modules.update(saved)


def _purge() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work for segment-anything / sam2 / open_clip; True when the shim is in use.

    Idempotent and thread-safe. A real, importable torchvision is left alone (returns False).
    """
    with _LOCK:
        existing = sys.modules.get("torchvision")
        if existing is not None:
            return is_shim(existing)
        if importlib.util.find_spec("torchvision") is not None:
            try:
                importlib.import_module("torchvision")
                return False
            except Exception as exc:  # built for another torch: unusable here
                log.warning(
                    "torchvision is installed but cannot be imported (%s: %s); using seemly's minimal shim",
                    type(exc).__name__,
                    exc,
                )
                _purge()
        sys.modules.update(_build())
        log.info(
            "torchvision is not installed: using seemly's minimal shim (segment-anything, sam2, open_clip)"
        )
        return True


def uninstall_shim() -> None:
    """Remove the shim from ``sys.modules`` (tests); a real torchvision is left alone."""
    with _LOCK:
        if is_shim():
            _purge()

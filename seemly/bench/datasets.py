"""Interactive-segmentation datasets in the plain folder layout used by GrabCut, Berkeley, DAVIS, ...

```
DIR/images/<stem>.<ext>     the picture (jpg, png, bmp, tif, webp; grayscale is expanded to RGB)
DIR/masks/<stem>.png        ground truth, nonzero = object
DIR/ignore/<stem>.png       optional: nonzero = left out of IoU (GrabCut's uncertain boundary band)
```

Stems are sorted so that every run sees the images in the same order; ``limit`` keeps the first N.
Images are decoded lazily, one sample at a time, so a large set never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """The folder does not hold a dataset in the expected layout."""


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth: ``image`` H x W x 3 uint8 RGB, ``gt`` and ``ignore`` boolean."""

    stem: str
    image: np.ndarray
    gt: np.ndarray
    ignore: np.ndarray | None
    image_path: Path

    @property
    def height(self) -> int:
        return int(self.gt.shape[0])

    @property
    def width(self) -> int:
        return int(self.gt.shape[1])


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to H x W x 3 uint8 RGB (grayscale expanded, alpha dropped, 16-bit scaled)."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DatasetError(f"cannot decode image {path}")
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DatasetError(f"unsupported pixel type {array.dtype} in {path}")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        array = array[:, :, :3]
    elif array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, ::-1])


def read_binary(path: Path) -> np.ndarray:
    """A mask file as a boolean array (nonzero = True); colour masks count any nonzero channel."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DatasetError(f"cannot decode mask {path}")
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


class Dataset:
    """The samples of one dataset folder, in sorted stem order."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = Path(root)
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise DatasetError(f"{self.root} must contain images/ and masks/ folders")
        by_stem: dict[str, Path] = {}
        for path in sorted(images_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            # Two files with one stem (a.jpg, a.png): the first in sorted name order wins.
            by_stem.setdefault(path.stem, path)
        stems = sorted(stem for stem in by_stem if (masks_dir / f"{stem}.png").is_file())
        if not stems:
            raise DatasetError(f"no image in {images_dir} has a mask in {masks_dir}")
        if limit is not None:
            if limit < 1:
                raise DatasetError(f"limit must be positive, got {limit}")
            stems = stems[:limit]
        self.stems: list[str] = stems
        self._images = by_stem
        self.name = self.root.name

    def __len__(self) -> int:
        return len(self.stems)

    def __iter__(self) -> Iterator[Sample]:
        for stem in self.stems:
            yield self.load(stem)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.stems[index])

    def load(self, stem: str) -> Sample:
        image = read_rgb(self._images[stem])
        gt = read_binary(self.root / "masks" / f"{stem}.png")
        if gt.shape != image.shape[:2]:
            raise DatasetError(f"{stem}: mask is {gt.shape[::-1]} but the image is {image.shape[1::-1]}")
        ignore_path = self.root / "ignore" / f"{stem}.png"
        ignore = read_binary(ignore_path) if ignore_path.is_file() else None
        if ignore is not None and ignore.shape != gt.shape:
            raise DatasetError(
                f"{stem}: ignore mask is {ignore.shape[::-1]} but the image is {gt.shape[::-1]}"
            )
        if ignore is not None and not ignore.any():
            ignore = None
        return Sample(stem=stem, image=image, gt=gt, ignore=ignore, image_path=self._images[stem])

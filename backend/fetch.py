"""Task image URL -> :class:`~backend.segmenter.ImageHandle`, fetching and decoding as little as possible.

Reads go through :class:`seemly.storage.Storage`, which holds every security rule: Label Studio paths
(``/data/upload/...``, ``/data/local-files/?d=...``) are fetched from Label Studio with its token,
``s3://`` through boto3, other http(s) hosts only when allowed, ``file://`` only inside the roots.

The first request for a URL downloads and decodes it (that is unavoidable: its sha256 is its
identity). The URL's identity and size are then remembered for ``ttl_seconds`` (LRU-bounded), so
later rounds build a handle without any I/O; the pixels are loaded again only if the segmenter has
dropped its cached embedding.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from backend.segmenter import ImageHandle
from seemly.images import DecodedImage, decode_image
from seemly.storage import Storage


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    width: int
    height: int
    size_bytes: int


class ImageFetcher:
    def __init__(
        self,
        storage: Storage,
        *,
        max_pixels: int,
        max_bytes: int,
        max_entries: int = 4096,
        ttl_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._known: OrderedDict[str, tuple[ImageInfo, float]] = OrderedDict()
        self.fetches = 0

    def load(self, uri: str) -> DecodedImage:
        """Download and decode now (raises StorageError / ImageError with a precise message)."""
        return self._load(uri)[0]

    def _load(self, uri: str) -> tuple[DecodedImage, ImageInfo]:
        data = self.storage.read(uri, max_bytes=self.max_bytes)
        decoded = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        info = ImageInfo(decoded.sha256, decoded.width, decoded.height, len(data))
        with self._lock:
            self.fetches += 1
            self._known[uri] = (info, self._clock())
            self._known.move_to_end(uri)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
        return decoded, info

    def known(self, uri: str) -> ImageInfo | None:
        """The remembered identity of ``uri``, if still fresh."""
        with self._lock:
            found = self._known.get(uri)
            if found is None:
                return None
            info, seen = found
            if self._clock() - seen > self.ttl_seconds:
                del self._known[uri]
                return None
            self._known.move_to_end(uri)
            return info

    def forget(self, uri: str) -> None:
        with self._lock:
            self._known.pop(uri, None)

    def resolve(self, uri: str) -> tuple[ImageHandle, ImageInfo]:
        """A handle for ``uri``: from memory when possible, else after one download."""
        info = self.known(uri)
        if info is None:
            decoded, info = self._load(uri)

            def first_load(decoded: DecodedImage = decoded) -> DecodedImage:
                return decoded

            return ImageHandle(decoded.sha256, decoded.width, decoded.height, uri, first_load), info
        return ImageHandle(info.sha256, info.width, info.height, uri, lambda: self.load(uri)), info

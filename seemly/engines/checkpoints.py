"""Loading user-supplied model checkpoints: fetch, hash, unpickle safely, check the architecture.

One path for every weight-based engine (SAM, SAM 2, fine-tuned versions of them):

1. :func:`fetch_checkpoint` turns a local path, ``file://`` URI or ``s3://`` URI into a local file.
   S3 objects are streamed (multipart, never held in memory) into a cache folder
   (``$SEEMLY_HOME/cache/checkpoints`` by default), keyed by the URI and the object's ETag and size, so
   a restart does not download again and a replaced object is downloaded anew.
2. The file's sha256 is computed (and logged); engines derive their ``model_version`` from it, so
   every cache key and stored mask changes when the weights change, whatever the file is called.
3. :func:`load_state_dict` reads it with ``torch.load(..., weights_only=True)``: a checkpoint can
   never run code. Wrappers (``{"model": ...}`` as SAM 2 ships, ``{"state_dict": ...}``) and a
   DistributedDataParallel ``module.`` prefix are unwrapped.
4. :func:`check_state_dict` compares it with the model built for it and names the first missing,
   unexpected and mis-shaped keys before anything is copied.

``file://`` URIs and bare paths are read directly, not through `Storage`'s ``file_roots`` confinement:
a checkpoint is operator configuration (like the database URL), never request input.

Every failure is a :class:`CheckpointError` (an :class:`~seemly.engines.base.EngineError`) whose
message names the checkpoint and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seemly.engines.base import EngineError

if TYPE_CHECKING:
    import torch

    from seemly.storage import Storage

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
MAX_LISTED_KEYS = 5
"""How many offending keys an architecture error names per category."""


class CheckpointError(EngineError):
    """The checkpoint cannot be used; the message names it and the reason."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file or object at the given location."""


class CheckpointCorruptError(CheckpointError):
    """The file exists but is not a readable torch checkpoint (truncated, wrong format, ...)."""


class CheckpointArchitectureError(CheckpointError):
    """The weights do not fit the model architecture (missing / unexpected / mis-shaped keys)."""


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint available as a local file, with its identity."""

    uri: str  # as configured (for messages)
    path: Path
    sha256: str
    size: int

    @property
    def short_hash(self) -> str:
        return self.sha256[:8]


# --- fetching ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    from seemly.config import get_settings

    return get_settings().home.expanduser() / "cache" / "checkpoints"


def fetch_checkpoint(
    location: str | os.PathLike[str],
    storage: Storage | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LocalCheckpoint:
    """A local file for ``location`` (path, ``file://`` or ``s3://``), with its sha256.

    ``storage`` reads ``s3://`` (default: `Storage.from_settings` of the process settings);
    ``cache_dir`` holds downloaded checkpoints (default: ``$SEEMLY_HOME/cache/checkpoints``).
    """
    text = os.fspath(location)
    if not text or not text.strip():
        raise CheckpointNotFoundError(
            "no checkpoint given: set SEEMLY_ENGINE_CHECKPOINT or pass checkpoint=..."
        )
    lowered = text.lower()
    if lowered.startswith("s3://"):
        return _fetch_s3(text, storage, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if lowered.startswith("file:"):
        from seemly.storage import FileLocation, StorageError, parse_uri

        try:
            parsed = parse_uri(text)
        except StorageError as exc:
            raise CheckpointError(f"checkpoint {text}: {exc}") from None
        assert isinstance(parsed, FileLocation)
        return _local(text, Path(parsed.path))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise CheckpointError(
            f"checkpoint {_shown(text)}: unsupported scheme {scheme!r}; use a local path, file:// or s3://"
        )
    return _local(text, Path(text).expanduser())


def _shown(uri: str) -> str:
    from seemly.storage import display_uri

    return display_uri(uri)


_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _local(uri: str, path: Path) -> LocalCheckpoint:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"checkpoint {uri}: no such file ({path})") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {uri}: cannot read {path} ({exc.strerror or exc})") from None
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {uri}: {path} is not a file")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        digest = _HASHES.get(key)
    if digest is None:
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {uri}: cannot read {path} ({exc.strerror or exc})") from None
        with _HASH_LOCK:
            _HASHES[key] = digest
    log.info("checkpoint %s: %s (%d bytes, sha256 %s)", uri, path, stat.st_size, digest)
    return LocalCheckpoint(uri, path, digest, stat.st_size)


def _fetch_s3(uri: str, storage: Storage | None, cache_dir: Path) -> LocalCheckpoint:
    from botocore.exceptions import BotoCoreError, ClientError

    from seemly.storage import S3Location, StorageError, parse_uri

    shown = _shown(uri)
    try:
        location = parse_uri(uri)
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {exc}") from None
    assert isinstance(location, S3Location)
    if not location.key or location.key.endswith("/"):
        raise CheckpointError(f"checkpoint {shown}: the URI names no object (expected s3://bucket/key)")
    if storage is None:
        from seemly.config import get_settings
        from seemly.storage import Storage

        storage = Storage.from_settings(get_settings())
    client = storage.s3_client
    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise CheckpointNotFoundError(f"checkpoint {shown}: no such S3 object") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise CheckpointError(f"checkpoint {shown}: access denied (check the S3 credentials)") from None
        raise CheckpointError(
            f"checkpoint {shown}: S3 request failed ({code or type(exc).__name__})"
        ) from None
    except BotoCoreError as exc:
        raise CheckpointError(f"checkpoint {shown}: cannot reach S3 ({type(exc).__name__})") from None
    size = int(head.get("ContentLength", -1))
    etag = str(head.get("ETag", "")).strip('"')
    identity = hashlib.sha256(f"{uri}\n{etag}\n{size}".encode()).hexdigest()[:24]
    name = Path(location.key).name or "checkpoint"
    target_dir = cache_dir / identity
    target = target_dir / name
    sidecar = target_dir / "checkpoint.json"
    if target.is_file() and sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            if meta.get("size") == size == target.stat().st_size and meta.get("etag") == etag:
                log.info("checkpoint %s: cached at %s (sha256 %s)", shown, target, meta["sha256"])
                return LocalCheckpoint(uri, target, str(meta["sha256"]), size)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: download again
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=target_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("checkpoint %s: downloading %d bytes to %s", shown, size, target)
        client.download_file(location.bucket, location.key, str(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, target)
    except (ClientError, BotoCoreError) as exc:
        raise CheckpointError(f"checkpoint {shown}: download failed ({type(exc).__name__})") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {shown}: cannot write the cache at {target_dir} ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    sidecar.write_text(json.dumps({"uri": shown, "etag": etag, "size": size, "sha256": digest}))
    log.info("checkpoint %s: %s (%d bytes, sha256 %s)", shown, target, size, digest)
    return LocalCheckpoint(uri, target, digest, size)


# --- reading -------------------------------------------------------------------------------------


def load_state_dict(
    checkpoint: LocalCheckpoint, wrapper_keys: tuple[str, ...] = ("model", "state_dict")
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name, read with ``weights_only=True`` (never runs pickled code)."""
    import torch

    shown = _shown(checkpoint.uri)
    is_zip = zipfile.is_zipfile(checkpoint.path)
    try:
        loaded = torch.load(checkpoint.path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "Unsupported global" in str(exc):
            raise CheckpointCorruptError(
                f"checkpoint {shown}: it holds Python objects other than tensors, which seemly refuses to "
                f"unpickle (torch.load(weights_only=True)); save a plain state_dict instead "
                f"({detail.split(' was not', 1)[0]})"
            ) from None
        raise CheckpointCorruptError(
            f"checkpoint {shown}: not a torch checkpoint (corrupt or truncated file?): {detail}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {shown}: not a readable torch checkpoint (corrupt or truncated file?): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    state = _unwrap(loaded, wrapper_keys)
    if state is None:
        kind = type(loaded).__name__
        keys = list(loaded)[:MAX_LISTED_KEYS] if isinstance(loaded, Mapping) else []
        raise CheckpointArchitectureError(
            f"checkpoint {shown}: expected a state_dict (names -> tensors), found a {kind}"
            + (f" with keys {', '.join(map(str, keys))}" if keys else "")
        )
    return state


def _unpickler_detail(text: str) -> str:
    """The useful part of torch's long weights-only error message."""
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())[:200] or "unreadable pickle"


def _unwrap(loaded: Any, wrapper_keys: tuple[str, ...]) -> dict[str, Any] | None:
    import torch

    for _ in range(3):
        if not isinstance(loaded, Mapping):
            return None
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            break
        inner = next((loaded[k] for k in wrapper_keys if isinstance(loaded.get(k), Mapping)), None)
        if inner is None:
            return None
        loaded = inner
    else:
        return None
    state = {str(k): v for k, v in loaded.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def describe_mismatch(expected: Mapping[str, Any], state_dict: Mapping[str, Any]) -> str | None:
    """What keeps ``state_dict`` from loading into a model whose state_dict is ``expected``; None if it fits."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            more = f", ... ({len(items) - MAX_LISTED_KEYS} more)" if len(items) > MAX_LISTED_KEYS else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:MAX_LISTED_KEYS])}{more}")
    return "; ".join(parts) or None


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Any], what: str, uri: str) -> None:
    """Raise :class:`CheckpointArchitectureError` naming the first offending keys unless it fits exactly."""
    problem = describe_mismatch(model.state_dict(), state_dict)
    if problem:
        raise CheckpointArchitectureError(
            f"checkpoint {_shown(uri)} does not fit {what}: {problem}. Is it a checkpoint of another model "
            "(pass the right model_type)?"
        )


def load_into(model: torch.nn.Module, state_dict: Mapping[str, Any], what: str, uri: str) -> None:
    """Check, then copy the weights into ``model`` (strict)."""
    check_state_dict(model, state_dict, what, uri)
    model.load_state_dict(state_dict, strict=True)

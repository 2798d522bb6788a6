"""Where training artifacts live (``SEEMLY_ARTIFACTS_URI``) and the storage that reads and writes them.

The default, ``file://$SEEMLY_HOME/artifacts``, is seemly's own folder: :func:`artifact_storage`
adds it (or any ``file://`` artifacts root) to the storage's file roots, so artifacts are readable
without listing the folder in ``SEEMLY_FILE_ROOTS``. On a multi-node Ray cluster use ``s3://`` (or
a shared filesystem): the Ray Train workers and the Serve replicas read the same artifacts.
"""

from __future__ import annotations

from pathlib import Path

from seemly.config import Settings
from seemly.storage import FileLocation, S3Location, Storage, parse_uri, path_to_uri


class ArtifactsError(ValueError):
    """An artifacts root that is neither ``file://`` nor ``s3://``."""


def artifacts_root(settings: Settings) -> str:
    """The artifacts root URI, without a trailing slash."""
    uri = settings.artifacts_uri or path_to_uri(Path(settings.home).expanduser() / "artifacts")
    location = parse_uri(uri)
    if not isinstance(location, FileLocation | S3Location):
        raise ArtifactsError(f"SEEMLY_ARTIFACTS_URI must be file:///dir or s3://bucket/prefix, not {uri!r}")
    return uri.rstrip("/")


def local_root(settings: Settings) -> Path | None:
    """The artifacts folder when the root is ``file://`` (created), else None."""
    location = parse_uri(artifacts_root(settings))
    if isinstance(location, FileLocation):
        path = Path(location.path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return None


def artifact_storage(settings: Settings) -> Storage:
    """The settings' storage, plus a ``file://`` artifacts root as a file root."""
    root = local_root(settings)
    if root is None:
        return Storage.from_settings(settings, default_max_bytes=None)
    return Storage.from_settings(settings, file_roots=[*settings.file_roots, root], default_max_bytes=None)


def artifact_uri(settings: Settings, project_id: int, job_id: int, name: str) -> str:
    """``<root>/projects/<project>/train-<job>/<name>``: one folder per training job, never reused."""
    return f"{artifacts_root(settings)}/projects/{project_id}/train-{job_id}/{name}"

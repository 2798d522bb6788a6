"""Bytes and listings by URI, with the security rules in one place.

Every process (ML backend, Ray workers, CLI) reads images and writes exports through `Storage`, so the
confinement of ``file://`` to configured roots, the SSRF guard on http(s) and the handling of secrets are
implemented once and tested once.

Accepted URIs
-------------
``s3://bucket/key``
    Through boto3 (AWS, MinIO, Ceph, moto: ``endpoint_url``). The key is taken verbatim, not
    percent-decoded, like the AWS CLI does.
``file:///abs/path`` (or ``file://localhost/abs/path``)
    Percent-decoded, then resolved (symlinks, ``..``); it must land inside one of ``file_roots``.
    Bare paths (``/abs/path``) are refused: ``/data/...`` already means "on the Label Studio server",
    and guessing between the two would be a security decision made by accident. Use `path_to_uri`.
``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``, ``/tasks/...``, ``/api/...``
    Paths on the Label Studio server (as they appear in task data); fetched from ``label_studio_url``
    with ``Authorization: Token <key>``.
``http(s)://host/...``
    Label Studio's own origin (token sent), or a host listed in ``http_allowed_hosts`` (no token).
    Every redirect hop is checked the same way, and the token never leaves Label Studio's origin.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, urlunsplit

import requests
from pydantic import SecretStr
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

if TYPE_CHECKING:
    from seemly.config import Settings

log = logging.getLogger(__name__)

LABEL_STUDIO_PATH_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/api/")
"""Scheme-less paths that Label Studio puts in task data; they are resolved against its URL."""

_CHUNK = 64 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_SENSITIVE_QUERY = re.compile(r"sig|token|secret|credential|password|key|auth", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- errors --------------------------------------------------------------------------------------


class StorageError(Exception):
    """Base of every storage failure; messages name the URI, never a credential."""


class ObjectNotFoundError(StorageError):
    """The object (or its bucket) does not exist."""


class StorageAccessError(StorageError):
    """Refused: outside the file roots, host not allowed, wrong or missing credentials, denied."""


class ObjectTooLargeError(StorageError):
    """The object is bigger than the byte limit of the read."""


class UnsupportedURIError(StorageError, ValueError):
    """The URI is malformed or uses a scheme/operation that storage does not handle."""


# --- URIs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    key: str


@dataclass(frozen=True, slots=True)
class FileLocation:
    path: str
    """Absolute, percent-decoded, NOT yet resolved: confinement happens in `Storage`."""


@dataclass(frozen=True, slots=True)
class HttpLocation:
    url: str
    """Absolute http(s) URL, or a path on the Label Studio server when `label_studio_path`."""
    label_studio_path: bool = False


Location = S3Location | FileLocation | HttpLocation


def display_uri(uri: str) -> str:
    """A URI safe to put in a message or a log: no userinfo, signed-query values redacted."""
    text = uri.replace("\x00", "\\x00")
    if text.lower().startswith(("http://", "https://")) or text.startswith("/"):
        try:
            parts = urlsplit(text)
            netloc = parts.netloc.rpartition("@")[2]
            query = urlencode(
                [
                    (k, "REDACTED" if _SENSITIVE_QUERY.search(k) else v)
                    for k, v in parse_qsl(parts.query, True)
                ],
                safe="/",
            )
            text = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
        except ValueError:
            text = text.split("?", 1)[0]
    return text if len(text) <= 512 else text[:509] + "..."


def parse_uri(uri: str) -> Location:
    """Validate and classify a URI; raises `UnsupportedURIError` with the reason."""
    if not isinstance(uri, str) or not uri:
        raise UnsupportedURIError("empty URI")
    shown = display_uri(uri)
    if "\x00" in uri:
        raise UnsupportedURIError(f"{shown}: URI contains a NUL byte")
    if uri != uri.strip():
        raise UnsupportedURIError(f"{shown!r}: URI has leading or trailing whitespace")
    lowered = uri.lower()
    if lowered.startswith("s3://"):
        return _parse_s3(uri, shown)
    if lowered.startswith("file:"):
        return _parse_file(uri, shown)
    if lowered.startswith(("http://", "https://")):
        _validate_http_url(uri, shown)
        return HttpLocation(uri)
    if uri.startswith(LABEL_STUDIO_PATH_PREFIXES):
        return HttpLocation(uri, label_studio_path=True)
    if uri.startswith("/"):
        raise UnsupportedURIError(
            f"{shown}: bare paths are not accepted; write file://{uri} for a local file "
            f"(Label Studio paths start with {', '.join(LABEL_STUDIO_PATH_PREFIXES)})"
        )
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    raise UnsupportedURIError(
        f"{shown}: unsupported URI" + (f" scheme {scheme!r}" if scheme else "") + "; use s3://, file://, "
        "http(s):// or a Label Studio /data/... path"
    )


def _parse_s3(uri: str, shown: str) -> S3Location:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UnsupportedURIError(f"{shown}: S3 URI has an empty bucket name (expected s3://bucket/key)")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise UnsupportedURIError(
            f"{shown}: invalid S3 bucket name {bucket!r} (3-63 chars: lowercase letters, digits, '.', '-', '_')"
        )
    if len(key.encode()) > 1024:
        raise UnsupportedURIError(f"{shown}: S3 key is longer than 1024 bytes")
    return S3Location(bucket, key)


def _parse_file(uri: str, shown: str) -> FileLocation:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UnsupportedURIError(
            f"{shown}: file URI with host {parts.netloc!r}; use file:///absolute/path (three slashes)"
        )
    if parts.query or parts.fragment:
        raise UnsupportedURIError(f"{shown}: file URI must not have a query or fragment ('?' is %3F)")
    path = unquote(parts.path, errors="strict")
    if "\x00" in path:
        raise UnsupportedURIError(f"{shown}: file URI decodes to a path with a NUL byte")
    if not path.startswith("/"):
        raise UnsupportedURIError(f"{shown}: file URI must hold an absolute path (file:///...)")
    return FileLocation(path)


def _validate_http_url(url: str, shown: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise UnsupportedURIError(f"{shown}: malformed URL ({exc})") from None
    if not parts.hostname:
        raise UnsupportedURIError(f"{shown}: URL has no host")
    if "@" in parts.netloc:
        raise UnsupportedURIError(f"{shown}: credentials inside URLs are not accepted")


def path_to_uri(path: str | os.PathLike[str]) -> str:
    """The ``file://`` URI of a local path (absolute, percent-encoded)."""
    return Path(path).absolute().as_uri()


# --- listing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object. `key` is the S3 key, or the absolute filesystem path for ``file://``."""

    uri: str
    key: str
    size: int
    mtime: datetime | None = None
    etag: str | None = None


# --- host policy ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _HostPattern:
    host: str  # lowercase; "*.example.com" matches subdomains only
    port: int | None

    @classmethod
    def parse(cls, pattern: str) -> _HostPattern:
        try:
            parts = urlsplit("//" + pattern.strip())
            host, port = parts.hostname, parts.port
        except ValueError:
            host = port = None
        if not host or parts.path or parts.query or "@" in parts.netloc:
            raise ValueError(
                f"invalid http_allowed_hosts entry {pattern!r}: expected host, host:port or *.domain"
            )
        return cls(host.rstrip("."), port)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").rstrip("."), parts.port or _DEFAULT_PORTS.get(scheme, 0)


@dataclass(frozen=True, slots=True)
class _LabelStudio:
    base_url: str  # no trailing slash; may carry a path prefix
    token: SecretStr | None

    @property
    def origin(self) -> tuple[str, str, int]:
        return _origin(self.base_url)


def _secret(value: str | SecretStr | None) -> SecretStr | None:
    if value is None or isinstance(value, SecretStr):
        return value or None
    return SecretStr(value) if value else None


# --- storage -------------------------------------------------------------------------------------


class Storage:
    """Read, list, test and write objects by URI; safe to share between threads.

    One boto3 client (created on first S3 use; boto3 clients are thread-safe) and one requests
    session per thread. The object pickles without its clients, so it can be shipped to Ray actors.
    """

    def __init__(
        self,
        *,
        file_roots: Iterable[str | os.PathLike[str]] = (),
        s3_endpoint_url: str | None = None,
        s3_region: str = "us-east-1",
        s3_access_key_id: str | SecretStr | None = None,
        s3_secret_access_key: str | SecretStr | None = None,
        s3_max_attempts: int = 4,
        s3_addressing_style: str | None = None,
        s3_page_size: int = 1000,
        http_allowed_hosts: Iterable[str] = (),
        label_studio_url: str | None = None,
        label_studio_token: str | SecretStr | None = None,
        default_max_bytes: int | None = 64 * 1024 * 1024,
        http_timeout: tuple[float, float] = (5.0, 60.0),
        max_redirects: int = 5,
        s3_timeout: tuple[float, float] = (5.0, 60.0),
    ) -> None:
        """`default_max_bytes` caps `read` when no `max_bytes` is given (None = no cap).

        `s3_addressing_style` defaults to "path" with a custom endpoint (MinIO, Ceph, moto need no
        wildcard DNS then) and to boto3's "auto" on AWS.
        """
        self.file_roots: tuple[Path, ...] = tuple(
            Path(os.path.realpath(Path(r).expanduser())) for r in file_roots
        )
        self.s3_endpoint_url = s3_endpoint_url or None
        self.s3_region = s3_region
        self._s3_access_key_id = _secret(s3_access_key_id)
        self._s3_secret_access_key = _secret(s3_secret_access_key)
        if (self._s3_access_key_id is None) != (self._s3_secret_access_key is None):
            raise ValueError("set both S3 access key id and secret access key, or neither (boto3 chain)")
        self.s3_max_attempts = s3_max_attempts
        self.s3_addressing_style = s3_addressing_style or ("path" if self.s3_endpoint_url else "auto")
        if not 1 <= s3_page_size <= 1000:
            raise ValueError("s3_page_size must be between 1 and 1000")
        self.s3_page_size = s3_page_size
        self.s3_timeout = s3_timeout
        self.http_allowed_hosts: tuple[str, ...] = tuple(http_allowed_hosts)
        self._host_patterns = tuple(_HostPattern.parse(h) for h in self.http_allowed_hosts)
        if default_max_bytes is not None and default_max_bytes < 1:
            raise ValueError("default_max_bytes must be positive (or None for no cap)")
        self.default_max_bytes = default_max_bytes
        self.http_timeout = http_timeout
        self.max_redirects = max_redirects
        self._label_studio: _LabelStudio | None = None
        if label_studio_url:
            self.set_label_studio(label_studio_url, label_studio_token)
        self._init_runtime()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Storage:
        """The storage every seemly process uses; keyword `overrides` win over settings."""
        kwargs: dict[str, Any] = {
            "file_roots": settings.file_roots,
            "s3_endpoint_url": settings.s3_endpoint_url,
            "s3_region": settings.s3_region,
            "s3_access_key_id": settings.s3_access_key_id,
            "s3_secret_access_key": settings.s3_secret_access_key,
            "s3_max_attempts": settings.s3_max_attempts,
            "http_allowed_hosts": settings.http_allowed_hosts,
            "label_studio_url": settings.label_studio_url,
            "label_studio_token": settings.label_studio_api_key,
            "default_max_bytes": settings.max_image_bytes,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- runtime state (not pickled) --------------------------------------------------------------

    def _init_runtime(self) -> None:
        self._s3_client: Any = None
        self._s3_lock = threading.Lock()
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_s3_client", "_s3_lock", "_local"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        ls = self._label_studio
        return (
            f"Storage(file_roots={[str(r) for r in self.file_roots]}, "
            f"s3_endpoint_url={display_uri(self.s3_endpoint_url) if self.s3_endpoint_url else None!r}, "
            f"s3_region={self.s3_region!r}, s3_credentials={'explicit' if self._s3_access_key_id else 'chain'}, "
            f"http_allowed_hosts={list(self.http_allowed_hosts)}, "
            f"label_studio_url={display_uri(ls.base_url) if ls else None!r})"
        )

    # -- Label Studio ------------------------------------------------------------------------------

    @property
    def label_studio_url(self) -> str | None:
        ls = self._label_studio
        return ls.base_url if ls else None

    def set_label_studio(self, url: str | None, token: str | SecretStr | None) -> None:
        """Point at a Label Studio server at runtime (the ML backend learns it from ``/setup``).

        Swapped atomically: a read in flight uses either the old or the new pair, never a mix.
        """
        if not url:
            self._label_studio = None
            return
        shown = display_uri(url)
        if not url.lower().startswith(("http://", "https://")):
            raise UnsupportedURIError(f"{shown}: Label Studio URL must start with http:// or https://")
        _validate_http_url(url, shown)
        parts = urlsplit(url)
        base = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))
        self._label_studio = _LabelStudio(base, _secret(token))

    # -- public API --------------------------------------------------------------------------------

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; `ObjectTooLargeError` past `max_bytes` (default: `default_max_bytes`)."""
        limit = self.default_max_bytes if max_bytes is None else max_bytes
        if limit is not None and limit < 0:
            raise ValueError("max_bytes must not be negative")
        match parse_uri(uri):
            case S3Location() as loc:
                return self._s3_read(loc, uri, limit)
            case FileLocation() as loc:
                return self._file_read(loc, uri, limit)
            case HttpLocation() as loc:
                return self._http_read(loc, uri, limit)
        raise AssertionError("unreachable")

    def exists(self, uri: str) -> bool:
        """Whether the object exists; access problems still raise (a denied object is not 'absent')."""
        match parse_uri(uri):
            case S3Location() as loc:
                return self._s3_exists(loc, uri)
            case FileLocation() as loc:
                path = self._confine(loc, uri)
                return path.is_file()
            case HttpLocation() as loc:
                return self._http_exists(loc, uri)
        raise AssertionError("unreachable")

    def iter_objects(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        """Stream the objects under a prefix, in key order, without holding the listing in memory.

        S3: every key starting with the prefix key (pages fetched lazily; "folder" markers ending in
        ``/`` skipped). file://: a directory (or a URI ending in ``/``) is walked recursively;
        otherwise the last path component is a name prefix in its parent directory. Symlinked directories are not followed; symlinked
        files are listed only if they resolve inside the roots.
        """
        match parse_uri(prefix_uri):
            case S3Location() as loc:
                return self._s3_iter(loc, prefix_uri)
            case FileLocation() as loc:
                return self._file_iter(loc, prefix_uri)
            case HttpLocation():
                raise UnsupportedURIError(f"{display_uri(prefix_uri)}: http(s) locations cannot be listed")
        raise AssertionError("unreachable")

    def write(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace an object. file:// writes are atomic (temp file + rename) and confined."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        match parse_uri(uri):
            case S3Location() as loc:
                self._s3_write(loc, uri, bytes(data), content_type)
            case FileLocation() as loc:
                self._file_write(loc, uri, data)
            case HttpLocation():
                raise UnsupportedURIError(
                    f"{display_uri(uri)}: writing to http(s) locations is not supported"
                )

    # -- file:// -----------------------------------------------------------------------------------

    def _within_roots(self, resolved: Path) -> bool:
        return any(resolved == root or resolved.is_relative_to(root) for root in self.file_roots)

    def _confine(self, loc: FileLocation, uri: str) -> Path:
        """Resolve symlinks and ``..`` first, then check the result against the roots."""
        if not self.file_roots:
            raise StorageAccessError(
                f"{display_uri(uri)}: file:// access is disabled: no file roots configured (SEEMLY_FILE_ROOTS)"
            )
        resolved = Path(os.path.realpath(loc.path))
        if not self._within_roots(resolved):
            raise StorageAccessError(f"{display_uri(uri)}: path is outside the configured file roots")
        return resolved

    def _file_read(self, loc: FileLocation, uri: str, limit: int | None) -> bytes:
        path = self._confine(loc, uri)
        shown = display_uri(uri)
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise ObjectNotFoundError(f"{shown}: not a regular file")
            if limit is not None and info.st_size > limit:
                raise ObjectTooLargeError(f"{shown}: {info.st_size} bytes exceeds the limit of {limit} bytes")
            # O_NOFOLLOW: the path was resolved above, so a symlink here means it was swapped since.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb") as fh:
                data = fh.read() if limit is None else fh.read(limit + 1)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{shown}: no such file") from None
        except PermissionError:
            raise StorageAccessError(f"{shown}: permission denied by the filesystem") from None
        except OSError as exc:
            raise StorageError(f"{shown}: cannot read file ({exc.strerror})") from None
        if limit is not None and len(data) > limit:
            raise ObjectTooLargeError(f"{shown}: grew past the limit of {limit} bytes while being read")
        return data

    def _file_write(self, loc: FileLocation, uri: str, data: bytes | bytearray | memoryview) -> None:
        path = self._confine(loc, uri)
        shown = display_uri(uri)
        if path in self.file_roots or loc.path.endswith("/"):
            raise UnsupportedURIError(f"{shown}: cannot write to a directory")
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The parent could have been swapped for a symlink since `_confine`: check again.
            if not self._within_roots(Path(os.path.realpath(path.parent))):
                raise StorageAccessError(f"{shown}: path is outside the configured file roots")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            with os.fdopen(os.open(tmp, flags, 0o666), "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except IsADirectoryError:
            raise UnsupportedURIError(f"{shown}: cannot write to a directory") from None
        except PermissionError:
            raise StorageAccessError(f"{shown}: permission denied by the filesystem") from None
        except OSError as exc:
            raise StorageError(f"{shown}: cannot write file ({exc.strerror})") from None
        finally:
            if tmp.exists():
                tmp.unlink(missing_ok=True)

    def _file_iter(self, loc: FileLocation, uri: str) -> Iterator[ObjectInfo]:
        path = self._confine(loc, uri)  # eager: a forbidden prefix fails at the call, not at next()
        if loc.path.endswith("/") or path.is_dir():
            return self._walk(path, "", uri)
        parent = path.parent
        if not self._within_roots(parent):
            raise StorageAccessError(
                f"{display_uri(uri)}: listing prefix reaches outside the configured file roots "
                "(end a directory with '/')"
            )
        return self._walk(parent, path.name, uri)

    def _walk(self, directory: Path, name_prefix: str, uri: str) -> Iterator[ObjectInfo]:
        """Depth-first, entries sorted by name with '/' appended to directories, which yields the
        paths in plain lexicographic order: the same order S3 lists keys in."""
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if e.name.startswith(name_prefix)]
        except FileNotFoundError:
            return
        except PermissionError:
            raise StorageAccessError(
                f"{display_uri(uri)}: permission denied listing {path_to_uri(directory)}"
            ) from None
        keyed: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if not self._within_roots(target) or not target.is_file():
                    log.debug("skipping symlink %s: not a file inside the roots", path_to_uri(entry.path))
                    continue
                keyed.append((entry.name, entry, False))
            elif entry.is_dir(follow_symlinks=False):
                keyed.append((entry.name + "/", entry, True))
            elif entry.is_file(follow_symlinks=False):
                keyed.append((entry.name, entry, False))
        keyed.sort(key=lambda item: item[0])
        for _, entry, is_dir in keyed:
            if is_dir:
                yield from self._walk(Path(entry.path), "", uri)
                continue
            try:
                info = entry.stat()
            except FileNotFoundError:  # deleted while we walked
                continue
            yield ObjectInfo(
                uri=path_to_uri(entry.path),
                key=entry.path,
                size=info.st_size,
                mtime=datetime.fromtimestamp(info.st_mtime, tz=UTC),
            )

    # -- s3:// -------------------------------------------------------------------------------------

    @property
    def s3_client(self) -> Any:
        """The shared boto3 S3 client (created on first use)."""
        if self._s3_client is None:
            with self._s3_lock:
                if self._s3_client is None:
                    self._s3_client = self._make_s3_client()
        return self._s3_client

    def _make_s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.s3_region,
            retries={"max_attempts": self.s3_max_attempts, "mode": "standard"},
            connect_timeout=self.s3_timeout[0],
            read_timeout=self.s3_timeout[1],
            max_pool_connections=32,
            s3={"addressing_style": self.s3_addressing_style},
        )
        credentials: dict[str, str] = {}
        if self._s3_access_key_id and self._s3_secret_access_key:
            credentials = {
                "aws_access_key_id": self._s3_access_key_id.get_secret_value(),
                "aws_secret_access_key": self._s3_secret_access_key.get_secret_value(),
            }
        # A private Session: the module-level default session is not thread-safe.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.s3_endpoint_url, config=config, **credentials)

    def _s3_error(self, exc: Exception, uri: str) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        shown = display_uri(uri)
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return ObjectNotFoundError(f"{shown}: bucket does not exist")
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return ObjectNotFoundError(f"{shown}: no such object")
            if code in _S3_ACCESS_MESSAGES:
                return StorageAccessError(f"{shown}: {_S3_ACCESS_MESSAGES[code]}")
            if status in (401, 403):
                return StorageAccessError(
                    f"{shown}: S3 refused the request (HTTP {status}): wrong credentials or missing permission"
                )
            return StorageError(f"{shown}: S3 error {code or 'unknown'} (HTTP {status})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageAccessError(
                f"{shown}: no S3 credentials found (set SEEMLY_S3_ACCESS_KEY_ID and "
                "SEEMLY_S3_SECRET_ACCESS_KEY, or configure the AWS credential chain)"
            )
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            endpoint = display_uri(self.s3_endpoint_url) if self.s3_endpoint_url else "AWS"
            return StorageError(f"{shown}: cannot reach the S3 endpoint {endpoint}")
        return StorageError(f"{shown}: S3 request failed ({type(exc).__name__})")

    def _s3_read(self, loc: S3Location, uri: str, limit: int | None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        shown = display_uri(uri)
        if not loc.key:
            raise UnsupportedURIError(f"{shown}: S3 URI has an empty key (expected s3://bucket/key)")
        try:
            response = self.s3_client.get_object(Bucket=loc.bucket, Key=loc.key)
        except (ClientError, BotoCoreError) as exc:
            raise self._s3_error(exc, uri) from exc
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if limit is not None and length is not None and length > limit:
                raise ObjectTooLargeError(f"{shown}: {length} bytes exceeds the limit of {limit} bytes")
            data = body.read() if limit is None else body.read(limit + 1)
        except (ClientError, BotoCoreError) as exc:
            raise self._s3_error(exc, uri) from exc
        finally:
            body.close()
        if limit is not None and len(data) > limit:
            raise ObjectTooLargeError(f"{shown}: larger than the limit of {limit} bytes")
        return data

    def _s3_exists(self, loc: S3Location, uri: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if not loc.key:
            raise UnsupportedURIError(
                f"{display_uri(uri)}: S3 URI has an empty key (expected s3://bucket/key)"
            )
        try:
            self.s3_client.head_object(Bucket=loc.bucket, Key=loc.key)
        except (ClientError, BotoCoreError) as exc:
            error = self._s3_error(exc, uri)
            if isinstance(error, ObjectNotFoundError):
                return False
            raise error from exc
        return True

    def _s3_write(self, loc: S3Location, uri: str, data: bytes, content_type: str | None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not loc.key or loc.key.endswith("/"):
            raise UnsupportedURIError(f"{display_uri(uri)}: S3 URI needs an object key (s3://bucket/key)")
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.s3_client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise self._s3_error(exc, uri) from exc

    def _s3_iter(self, loc: S3Location, uri: str) -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.s3_client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=loc.bucket, Prefix=loc.key, PaginationConfig={"PageSize": self.s3_page_size}
        )
        try:
            for page in pages:  # each iteration is one ListObjectsV2 request
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    yield ObjectInfo(
                        uri=f"s3://{loc.bucket}/{key}",
                        key=key,
                        size=int(obj.get("Size", 0)),
                        mtime=obj.get("LastModified"),
                        etag=str(obj["ETag"]).strip('"') if obj.get("ETag") else None,
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._s3_error(exc, uri) from exc

    # -- http(s) ---------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keep no cookies
            retry = Retry(
                total=3,
                connect=3,
                read=2,
                status=2,
                backoff_factor=0.2,
                status_forcelist=(502, 503, 504),
                allowed_methods=frozenset({"GET", "HEAD"}),
                redirect=False,
                raise_on_status=False,
            )
            adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def _authorize(self, url: str, uri: str, ls: _LabelStudio | None) -> bool:
        """Whether `url` may be fetched: True = Label Studio's origin (send the token)."""
        shown = display_uri(uri)
        if not url.lower().startswith(("http://", "https://")):
            raise StorageAccessError(f"{shown}: redirected to a non-http(s) location")
        _validate_http_url(url, shown)
        scheme, host, port = _origin(url)
        if ls is not None and (scheme, host, port) == ls.origin:
            return True
        if any(p.matches(host, port) for p in self._host_patterns):
            return False
        where = "" if url == uri else f" (reached {display_uri(url)})"
        raise StorageAccessError(
            f"{shown}: host {host!r} is neither Label Studio's nor in SEEMLY_HTTP_ALLOWED_HOSTS{where}"
        )

    def _http_open(self, loc: HttpLocation, uri: str) -> requests.Response:
        """GET with redirects followed by hand, so that every hop passes `_authorize`."""
        ls = self._label_studio  # one snapshot for the whole request
        shown = display_uri(uri)
        if loc.label_studio_path:
            if ls is None:
                raise StorageAccessError(
                    f"{shown}: a Label Studio path, but no Label Studio URL is configured "
                    "(SEEMLY_LABEL_STUDIO_URL, or the ML backend's /setup)"
                )
            url = ls.base_url + loc.url
        else:
            url = loc.url
        session = self._session()
        for _ in range(self.max_redirects + 1):
            to_label_studio = self._authorize(url, uri, ls)
            headers = {"Accept": "*/*"}
            if to_label_studio and ls is not None and ls.token is not None:
                headers["Authorization"] = f"Token {ls.token.get_secret_value()}"
            try:
                response = session.get(
                    url, headers=headers, stream=True, allow_redirects=False, timeout=self.http_timeout
                )
            except requests.RequestException as exc:
                raise StorageError(f"{shown}: HTTP request failed ({type(exc).__name__})") from None
            if response.status_code in _REDIRECT_CODES and "location" in response.headers:
                location = response.headers["location"]
                response.close()
                url = urljoin(url, location)
                continue
            return response
        raise StorageError(f"{shown}: more than {self.max_redirects} redirects")

    def _http_check(self, response: requests.Response, uri: str) -> None:
        status = response.status_code
        if status < 400:
            return
        response.close()
        shown = display_uri(uri)
        if status in (404, 410):
            raise ObjectNotFoundError(f"{shown}: not found (HTTP {status})")
        if status in (401, 403):
            raise StorageAccessError(f"{shown}: refused (HTTP {status}); check the Label Studio token")
        raise StorageError(f"{shown}: HTTP {status}")

    def _http_read(self, loc: HttpLocation, uri: str, limit: int | None) -> bytes:
        response = self._http_open(loc, uri)
        self._http_check(response, uri)
        shown = display_uri(uri)
        with response:
            declared = response.headers.get("content-length", "")
            if limit is not None and declared.isdigit() and int(declared) > limit:
                raise ObjectTooLargeError(f"{shown}: {declared} bytes exceeds the limit of {limit} bytes")
            buffer = bytearray()
            try:
                for chunk in response.iter_content(_CHUNK):
                    buffer += chunk
                    if limit is not None and len(buffer) > limit:
                        raise ObjectTooLargeError(f"{shown}: larger than the limit of {limit} bytes")
            except requests.RequestException as exc:
                raise StorageError(f"{shown}: download interrupted ({type(exc).__name__})") from None
        return bytes(buffer)

    def _http_exists(self, loc: HttpLocation, uri: str) -> bool:
        response = self._http_open(loc, uri)
        with response:
            if response.status_code in (404, 410):
                return False
            self._http_check(response, uri)
            return True


_S3_ACCESS_MESSAGES = {
    "InvalidAccessKeyId": "S3 does not know this access key id (check SEEMLY_S3_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "S3 rejected the signature: the secret key does not match the access key id "
    "(check SEEMLY_S3_SECRET_ACCESS_KEY)",
    "AccessDenied": "access denied by S3 (the credentials lack permission, or a bucket policy forbids it)",
    "AllAccessDisabled": "all access to this S3 object has been disabled",
    "ExpiredToken": "the S3 credentials have expired",
    "TokenRefreshRequired": "the S3 credentials have expired",
    "InvalidToken": "the S3 session token is invalid",
    "AccountProblem": "S3 reports a problem with the account",
}

"""Storage against real parts: moto's S3 server on loopback, a real directory tree, local HTTP servers."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from seemly.config import Settings
from seemly.storage import (
    FileLocation,
    HttpLocation,
    ObjectNotFoundError,
    ObjectTooLargeError,
    S3Location,
    Storage,
    StorageAccessError,
    StorageError,
    UnsupportedURIError,
    _HostPattern,
    parse_uri,
    path_to_uri,
)
from tests.fixtures.s3 import S3Bucket, S3Credentials, make_s3_storage

TOKEN = "ls-token-s3cr3t"

# --- URI parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "empty URI"),
        ("s3://", "empty bucket"),
        ("s3:///key.png", "empty bucket"),
        ("s3://Bad_Bucket/key", "invalid S3 bucket name"),
        ("s3://ab/key", "invalid S3 bucket name"),
        ("s3://bucket/a\x00b", "NUL byte"),
        ("file:///root/a%00b", "NUL byte"),
        ("ftp://host/file.png", "scheme 'ftp'"),
        ("gs://bucket/key", "scheme 'gs'"),
        ("images/cat.png", "unsupported URI"),
        ("/etc/passwd", "bare paths are not accepted"),
        ("file://otherhost/etc/passwd", "file URI with host"),
        ("file:relative/path", "absolute path"),
        ("file:///root/a.png?x=1", "query or fragment"),
        ("http:///no-host", "no host"),
        ("http://host:notaport/x", "malformed URL"),
        (" s3://bucket/key", "whitespace"),
    ],
)
def test_parse_uri_rejects_malformed(uri: str, reason: str) -> None:
    with pytest.raises(UnsupportedURIError, match=reason):
        parse_uri(uri)


def test_parse_uri_classifies() -> None:
    # S3 keys are verbatim (no percent-decoding), file paths are percent-decoded.
    assert parse_uri("s3://my-bucket/a b/%20?.png") == S3Location("my-bucket", "a b/%20?.png")
    assert parse_uri("s3://my-bucket") == S3Location("my-bucket", "")
    assert parse_uri("file:///srv/img%20s/a.png") == FileLocation("/srv/img s/a.png")
    assert parse_uri("file://localhost/srv/a.png") == FileLocation("/srv/a.png")
    assert parse_uri("/data/upload/3/a.png") == HttpLocation("/data/upload/3/a.png", label_studio_path=True)
    assert parse_uri("/data/local-files/?d=x/y.png").label_studio_path  # type: ignore[union-attr]
    assert parse_uri("https://example.com/a.png") == HttpLocation("https://example.com/a.png")


def test_credentials_in_urls_are_refused_without_echoing_them() -> None:
    with pytest.raises(UnsupportedURIError, match="credentials inside URLs") as err:
        parse_uri("http://user:hunter2@example.com/a.png")
    assert "hunter2" not in str(err.value)


def test_invalid_allowed_host_entry() -> None:
    with pytest.raises(ValueError, match="http_allowed_hosts"):
        Storage(http_allowed_hosts=["http://example.com/path"])


def test_host_patterns() -> None:
    wildcard = _HostPattern.parse("*.example.com")
    assert wildcard.matches("img.example.com", 443)
    assert not wildcard.matches("example.com", 443)
    assert not wildcard.matches("evilexample.com", 443)
    with_port = _HostPattern.parse("Example.com:8080")
    assert with_port.matches("example.com", 8080)
    assert not with_port.matches("example.com", 80)


# --- S3 -------------------------------------------------------------------------------------------


def test_s3_write_read_exists_roundtrip(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.storage
    uri = s3_bucket.uri("masks/a b+c.png")
    assert not storage.exists(uri)
    storage.write(uri, b"\x89PNG data", content_type="image/png")
    assert storage.exists(uri)
    assert storage.read(uri) == b"\x89PNG data"
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="masks/a b+c.png")
    assert head["ContentType"] == "image/png"
    [info] = list(storage.iter_objects(s3_bucket.uri("masks/")))
    assert (info.uri, info.key, info.size) == (uri, "masks/a b+c.png", 9)
    assert info.etag and '"' not in info.etag
    assert info.mtime is not None and info.mtime.tzinfo is not None


def test_s3_concurrent_reads_share_one_client(s3_bucket: S3Bucket) -> None:
    uris = [s3_bucket.put(f"c/{i}", str(i).encode()) for i in range(24)]
    storage = s3_bucket.storage
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(storage.read, uris)) == [str(i).encode() for i in range(24)]


def test_s3_listing_streams_across_pages(s3_bucket: S3Bucket) -> None:
    keys = [f"imgs/{i:05d}.png" for i in range(1500)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3_bucket.put(key, b"x"), keys))
    s3_bucket.put("imgs/folder/", b"")  # a console-style "folder" marker: not an object
    s3_bucket.put("other/0.png", b"x")

    storage = s3_bucket.storage
    calls: list[dict] = []
    storage.s3_client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda params, **_: calls.append(params)
    )
    listing = storage.iter_objects(s3_bucket.uri("imgs/"))
    first = next(listing)
    assert first.key == keys[0]
    assert len(calls) == 1, "the second page must not be fetched before the first is consumed"
    rest = [info.key for info in listing]
    assert [first.key, *rest] == keys
    assert len(calls) == 2  # 1000 + 500 with S3's default page size


def test_s3_small_page_size(s3_bucket: S3Bucket) -> None:
    for i in range(7):
        s3_bucket.put(f"p/{i}", b"x")
    storage = make_s3_storage(s3_bucket.endpoint_url, s3_page_size=3)
    calls: list[int] = []
    storage.s3_client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: calls.append(1))
    assert [o.key for o in storage.iter_objects(s3_bucket.uri("p/"))] == [f"p/{i}" for i in range(7)]
    assert len(calls) == 3


def test_s3_missing_key_and_bucket(s3_bucket: S3Bucket) -> None:
    storage = s3_bucket.storage
    with pytest.raises(ObjectNotFoundError, match=r"s3://.*/nope\.png: no such object"):
        storage.read(s3_bucket.uri("nope.png"))
    assert not storage.exists(s3_bucket.uri("nope.png"))
    with pytest.raises(ObjectNotFoundError, match="bucket does not exist"):
        storage.read("s3://no-such-bucket-here/a.png")
    with pytest.raises(ObjectNotFoundError, match="bucket does not exist"):
        list(storage.iter_objects("s3://no-such-bucket-here/"))
    with pytest.raises(UnsupportedURIError, match="empty key"):
        storage.read(s3_bucket.uri(""))


def test_s3_max_bytes(s3_bucket: S3Bucket) -> None:
    uri = s3_bucket.put("ten.bin", b"0123456789")
    storage = s3_bucket.storage
    assert storage.read(uri, max_bytes=10) == b"0123456789"
    with pytest.raises(ObjectTooLargeError, match=r"ten\.bin: 10 bytes exceeds the limit of 9"):
        storage.read(uri, max_bytes=9)
    capped = make_s3_storage(s3_bucket.endpoint_url, default_max_bytes=5)
    with pytest.raises(ObjectTooLargeError):
        capped.read(uri)


def test_s3_wrong_credentials(s3_bucket: S3Bucket, s3_enforced_auth: S3Credentials) -> None:
    uri = s3_bucket.uri("a.png")
    good = make_s3_storage(s3_bucket.endpoint_url, s3_enforced_auth)
    good.write(uri, b"ok")
    assert good.read(uri) == b"ok"

    wrong_secret = make_s3_storage(
        s3_bucket.endpoint_url, S3Credentials(s3_enforced_auth.access_key_id, "not-the-secret")
    )
    with pytest.raises(StorageAccessError, match="secret key does not match") as err:
        wrong_secret.read(uri)
    assert "not-the-secret" not in str(err.value)
    with pytest.raises(StorageAccessError, match="secret key does not match"):
        list(wrong_secret.iter_objects(s3_bucket.uri()))
    with pytest.raises(StorageAccessError, match="HTTP 403"):  # HEAD responses carry no error code
        wrong_secret.exists(uri)

    unknown_key = make_s3_storage(s3_bucket.endpoint_url, S3Credentials("AKIAUNKNOWN0000000", "x"))
    with pytest.raises(StorageAccessError, match="does not know this access key id"):
        unknown_key.read(uri)
    with pytest.raises(StorageAccessError):
        unknown_key.write(uri, b"no")


def test_s3_unreachable_endpoint() -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    storage = make_s3_storage(f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint") as err:
        storage.read("s3://bucket/a.png")
    assert not isinstance(err.value, StorageAccessError)


def test_storage_pickles_and_hides_secrets(s3_bucket: S3Bucket) -> None:
    uri = s3_bucket.put("p.bin", b"pickled")
    storage = make_s3_storage(
        s3_bucket.endpoint_url, label_studio_url="http://ls:8080", label_studio_token=TOKEN
    )
    _ = storage.s3_client  # created before pickling: must not travel
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read(uri) == b"pickled"
    assert clone.label_studio_url == "http://ls:8080"

    settings = Settings(
        s3_access_key_id=SecretStr("AKIA-visible-nowhere"),
        s3_secret_access_key=SecretStr("very-secret-key"),
        label_studio_url="http://ls:8080/",
        label_studio_api_key=SecretStr(TOKEN),
    )
    text = repr(Storage.from_settings(settings))
    for secret in ("AKIA-visible-nowhere", "very-secret-key", TOKEN):
        assert secret not in text
    assert "http://ls:8080" in text


# --- file:// --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A root with files, plus a sibling directory outside it holding a secret."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "imgs" / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    for rel in ["imgs/a.png", "imgs/a-c.png", "imgs/sub/b.png", "imgs/z.png", "top.png"]:
        (root / rel).write_bytes(rel.encode())
    (root / "imgs" / "escape.png").symlink_to(outside / "secret.txt")
    (root / "imgs" / "linked-dir").symlink_to(outside, target_is_directory=True)
    (root / "imgs" / "alias.png").symlink_to(root / "top.png")
    return root, outside


def test_file_read_and_list(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    storage = Storage(file_roots=[root])
    assert storage.read(path_to_uri(root / "imgs" / "a.png")) == b"imgs/a.png"
    assert storage.read(f"file://localhost{root}/top.png") == b"top.png"
    assert storage.exists(path_to_uri(root / "top.png"))
    assert not storage.exists(path_to_uri(root / "missing.png"))

    listing = storage.iter_objects(path_to_uri(root / "imgs"))
    assert isinstance(listing, Iterator)
    names = [Path(info.key).relative_to(root).as_posix() for info in listing]
    # Byte order of the full relative path (as S3 lists keys): "a-c.png" < "a.png" < "alias.png" < "sub/".
    # The symlink leaving the root and the symlinked directory are skipped.
    assert names == ["imgs/a-c.png", "imgs/a.png", "imgs/alias.png", "imgs/sub/b.png", "imgs/z.png"]
    assert names == sorted(names)
    info = next(storage.iter_objects(path_to_uri(root / "top.png")))
    assert (info.uri, info.size) == (path_to_uri(root / "top.png"), 7)
    # Not a directory: the last component is a name prefix, as in S3.
    assert [Path(i.key).name for i in storage.iter_objects(path_to_uri(root / "imgs" / "a"))] == [
        "a-c.png",
        "a.png",
        "alias.png",
    ]
    assert list(storage.iter_objects(path_to_uri(root / "nothing-here" / "x"))) == []
    assert list(storage.iter_objects(path_to_uri(root / "im") + "/")) == []  # a directory, not a prefix


@pytest.mark.parametrize(
    "make_uri",
    [
        lambda root: f"file://{root}/../outside/secret.txt",
        lambda root: f"file://{root}/imgs/../../outside/secret.txt",
        lambda root: f"file://{root}/%2e%2e/outside/secret.txt",
        lambda root: f"file://{root}/imgs/%2E%2E/%2e%2e/outside/secret.txt",
        lambda root: f"file://{root}/imgs/escape.png",  # symlink out of the root
        lambda root: f"file://{root}/imgs/linked-dir/secret.txt",  # through a symlinked directory
        lambda root: f"file://{root.parent}/outside/secret.txt",  # absolute path outside
        lambda root: "file:///etc/passwd",
        lambda root: f"file://{root}-sibling/x.png",  # a string prefix of the root is not inside it
    ],
)
def test_file_confinement(tree: tuple[Path, Path], make_uri) -> None:
    root, outside = tree
    storage = Storage(file_roots=[root])
    uri = make_uri(root)
    with pytest.raises(StorageAccessError, match="outside the configured file roots"):
        storage.read(uri)
    with pytest.raises(StorageAccessError):
        storage.write(uri, b"overwritten")
    with pytest.raises(StorageAccessError):
        storage.exists(uri)
    assert (outside / "secret.txt").read_bytes() == b"secret"


def test_file_listing_confined(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    storage = Storage(file_roots=[root])
    with pytest.raises(StorageAccessError):
        storage.iter_objects(path_to_uri(outside))
    with pytest.raises(StorageAccessError):
        storage.iter_objects(f"file://{root}/imgs/linked-dir/")
    with pytest.raises(StorageAccessError, match="no file roots configured"):
        Storage().read(path_to_uri(root / "top.png"))


def test_file_errors_and_max_bytes(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    storage = Storage(file_roots=[root])
    with pytest.raises(ObjectNotFoundError, match="no such file"):
        storage.read(path_to_uri(root / "missing.png"))
    with pytest.raises(ObjectNotFoundError, match="not a regular file"):
        storage.read(path_to_uri(root / "imgs"))
    assert storage.read(path_to_uri(root / "top.png"), max_bytes=7) == b"top.png"
    with pytest.raises(ObjectTooLargeError, match="7 bytes exceeds the limit of 6"):
        storage.read(path_to_uri(root / "top.png"), max_bytes=6)


def test_file_write(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    storage = Storage(file_roots=[root])
    uri = path_to_uri(root / "exports" / "2024" / "mask 1.png")
    storage.write(uri, b"first")
    storage.write(uri, bytearray(b"second"))
    assert (root / "exports" / "2024" / "mask 1.png").read_bytes() == b"second"
    assert os.listdir(root / "exports" / "2024") == ["mask 1.png"]  # no temp file left behind
    with pytest.raises(UnsupportedURIError, match="directory"):
        storage.write(path_to_uri(root / "imgs") + "/", b"x")
    with pytest.raises(UnsupportedURIError, match="directory"):
        storage.write(path_to_uri(root / "imgs"), b"x")
    with pytest.raises(TypeError):
        storage.write(uri, "text")  # type: ignore[arg-type]


# --- http(s) and Label Studio ----------------------------------------------------------------------


@dataclass
class FakeServer:
    """A loopback HTTP server that records what it received."""

    base_url: str
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    redirect_to: str = ""


def _start_server(host_name: str, expected_token: str | None) -> tuple[FakeServer, ThreadingHTTPServer]:
    state = FakeServer(base_url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            state.requests.append((self.path, dict(self.headers)))
            parts = urlsplit(self.path)
            if expected_token is not None and self.headers.get("Authorization") != f"Token {expected_token}":
                return self._send(401, b"no")
            if parts.path == "/data/upload/1/img.png":
                return self._send(200, b"image-bytes")
            if parts.path == "/data/local-files/":
                return self._send(200, ("local:" + parse_qs(parts.query)["d"][0]).encode())
            if parts.path == "/public.png":
                return self._send(200, b"public")
            if parts.path == "/redirect-away":
                return self._redirect(state.redirect_to)
            if parts.path == "/redirect-home":
                return self._redirect("/data/upload/1/img.png")
            if parts.path == "/loop":
                return self._redirect("/loop")
            if parts.path == "/data/big-declared":
                return self._send(200, b"x" * 5000)
            if parts.path == "/data/big-streamed":  # no Content-Length: the cap must apply while reading
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"y" * 1000)
                return None
            return self._send(404, b"missing")

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.base_url = f"http://{host_name}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return state, server


@pytest.fixture
def label_studio() -> Iterator[FakeServer]:
    """Stands in for Label Studio: every request needs ``Authorization: Token <TOKEN>``."""
    state, server = _start_server("127.0.0.1", TOKEN)
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def other_host() -> Iterator[FakeServer]:
    """Another origin ("localhost" is a different host name than 127.0.0.1), no auth."""
    state, server = _start_server("localhost", None)
    yield state
    server.shutdown()
    server.server_close()


def test_label_studio_paths_sent_with_token(label_studio: FakeServer) -> None:
    storage = Storage(label_studio_url=label_studio.base_url + "/", label_studio_token=TOKEN)
    assert storage.read("/data/upload/1/img.png") == b"image-bytes"
    assert storage.read("/data/local-files/?d=images/a.png") == b"local:images/a.png"
    assert storage.read(label_studio.base_url + "/data/upload/1/img.png") == b"image-bytes"
    assert storage.read(label_studio.base_url + "/redirect-home") == b"image-bytes"
    assert storage.exists("/data/upload/1/img.png")
    assert not storage.exists("/data/upload/1/none.png")
    assert all(headers["Authorization"] == f"Token {TOKEN}" for _, headers in label_studio.requests)
    with pytest.raises(ObjectNotFoundError, match="HTTP 404"):
        storage.read("/data/upload/1/none.png")


def test_label_studio_token_errors_and_runtime_update(label_studio: FakeServer) -> None:
    storage = Storage()
    with pytest.raises(StorageAccessError, match="no Label Studio URL is configured"):
        storage.read("/data/upload/1/img.png")
    storage.set_label_studio(label_studio.base_url, "wrong-token")
    with pytest.raises(StorageAccessError, match="HTTP 401") as err:
        storage.read("/data/upload/1/img.png")
    assert "wrong-token" not in str(err.value) and "wrong-token" not in repr(storage)
    storage.set_label_studio(label_studio.base_url, SecretStr(TOKEN))  # as the ML backend's /setup does
    assert storage.read("/data/upload/1/img.png") == b"image-bytes"


def test_disallowed_hosts_are_never_contacted(label_studio: FakeServer, other_host: FakeServer) -> None:
    storage = Storage(label_studio_url=label_studio.base_url, label_studio_token=TOKEN)
    with pytest.raises(StorageAccessError, match="'localhost' is neither Label Studio's nor in"):
        storage.read(other_host.base_url + "/public.png")
    with pytest.raises(StorageAccessError):
        storage.read("http://169.254.169.254/latest/meta-data/")
    other_host.redirect_to = label_studio.base_url + "/data/upload/1/img.png"
    label_studio.redirect_to = other_host.base_url + "/public.png"
    with pytest.raises(StorageAccessError, match="reached http://localhost"):
        storage.read(label_studio.base_url + "/redirect-away")
    assert other_host.requests == []


def test_signed_urls_are_redacted_in_errors() -> None:
    uri = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Credential=AKIAX%2F1&X-Amz-Signature=deadbeef&v=1"
    with pytest.raises(StorageAccessError) as err:
        Storage().read(uri)
    message = str(err.value)
    assert "deadbeef" not in message and "AKIAX" not in message
    assert "X-Amz-Signature=REDACTED" in message and "v=1" in message


def test_allowed_host_gets_no_token(label_studio: FakeServer, other_host: FakeServer) -> None:
    storage = Storage(
        label_studio_url=label_studio.base_url, label_studio_token=TOKEN, http_allowed_hosts=["localhost"]
    )
    assert storage.read(other_host.base_url + "/public.png") == b"public"
    label_studio.redirect_to = other_host.base_url + "/public.png"
    assert (
        storage.read(label_studio.base_url + "/redirect-away") == b"public"
    )  # an allowed host may be redirected to
    assert [path for path, _ in other_host.requests] == ["/public.png", "/public.png"]
    assert all("Authorization" not in headers for _, headers in other_host.requests)


def test_http_limits(label_studio: FakeServer) -> None:
    storage = Storage(label_studio_url=label_studio.base_url, label_studio_token=TOKEN)
    assert len(storage.read("/data/big-declared", max_bytes=5000)) == 5000
    with pytest.raises(ObjectTooLargeError, match="5000 bytes exceeds the limit of 4999"):
        storage.read("/data/big-declared", max_bytes=4999)
    with pytest.raises(ObjectTooLargeError, match="larger than the limit of 50000"):
        storage.read("/data/big-streamed", max_bytes=50_000)
    assert len(storage.read("/data/big-streamed", max_bytes=100_000)) == 100_000
    with pytest.raises(StorageError, match="more than 5 redirects"):
        storage.read(label_studio.base_url + "/loop")
    with pytest.raises(UnsupportedURIError, match="cannot be listed"):
        storage.iter_objects("/data/upload/")
    with pytest.raises(UnsupportedURIError, match="writing to http"):
        storage.write("/data/upload/x.png", b"x")

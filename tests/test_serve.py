"""The Ray Serve segmenter (workers/serve.py) and its client (backend/serve_client.py).

One deployment for the module (2 ``Segmenter`` replicas at 0.25 CPU, the HTTP ingress, the Serve
proxy on a free 127.0.0.1 port) on the session's shared Ray (``ray_local``). The engine is the real
classic engine on small synthetic images, each with its object at a different place, so that a mask
computed from another image's state is caught by its IoU.

Tests that reconfigure the live deployment put the configuration back; the replica-kill test runs
last and waits for the replacement. The module deletes its application and stops Serve at the end.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pytest
import requests

from backend.segmenter import ImageHandle, make_segmenter_client
from backend.serve_client import SegmenterUnavailableError, ServeSegmenter
from seemly.config import Settings
from seemly.engines.base import EngineError
from seemly.images import DecodedImage
from seemly.masks import Mask
from seemly.prompts import Click, PromptError, PromptRound, RoundResult
from seemly.serving import WireImage

SIZE = 96
VERSION_B = "classic-b"  # a second version of the same engine, served side by side
SLOW = "classic-slow"  # embeds take >= 3 s (the replica-kill test needs a request in flight)


@dataclass
class Picture:
    """A synthetic image whose object (a disk) sits at a place of its own."""

    index: int
    pixels: np.ndarray
    truth: np.ndarray
    center: tuple[int, int]  # (x, y)
    loads: list[int] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.pixels.tobytes()).hexdigest()

    def handle(self) -> ImageHandle:
        decoded = DecodedImage(self.pixels, self.sha256, SIZE, SIZE, "PNG")

        def load() -> DecodedImage:
            self.loads.append(1)
            return decoded

        return ImageHandle(self.sha256, SIZE, SIZE, f"test://{self.index}", load)

    def click(self) -> PromptRound:
        x, y = self.center
        return PromptRound(prompts=[Click(x=x + 0.5, y=y + 0.5)])

    def iou(self, mask: np.ndarray) -> float:
        return float((mask & self.truth).sum() / max(1, (mask | self.truth).sum()))

    def body(self, *, image: bool, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "sha256": self.sha256,
            "width": SIZE,
            "height": SIZE,
            "round": self.click().model_dump(mode="json"),
            **extra,
        }
        if image:
            body["image"] = WireImage.from_array(self.pixels).model_dump()
        return body


def picture(index: int) -> Picture:
    rng = np.random.default_rng(1000 + index)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = 100 + 25 * np.sin(xx / 7.0 + index) * np.cos(yy / 9.0)
    pixels = np.stack([base, base + 8, base - 8], axis=2) + rng.normal(0, 5, (SIZE, SIZE, 3))
    # 5 x 5 grid of distinct centres: no two pictures of one test share a position.
    cx, cy = 14 + 17 * (index % 5), 14 + 17 * ((index // 5) % 5)
    truth = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(truth, (cx, cy), 9, 1, -1)
    pixels[truth > 0] = np.array([210, 50, 40]) + rng.normal(0, 4, (int(truth.sum()), 3))
    return Picture(index, np.clip(pixels, 0, 255).astype(np.uint8), truth > 0, (cx, cy))


@dataclass
class Service:
    url: str
    port: int

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=60)

    def segment(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.post("/v1/segment", body)
        assert response.status_code == 200, response.text
        return response.json()

    @staticmethod
    def handle() -> Any:
        from ray import serve

        return serve.get_deployment_handle("Segmenter", app_name="segmenter")

    def info(self, sha256: str | None = None) -> dict[str, Any]:
        """The replica that serves ``sha256`` (any replica without)."""
        return self.handle().info.remote(sha256=sha256).result(timeout_s=30)

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Every replica's info, found by asking for images until each replica answered."""
        found: dict[str, dict[str, Any]] = {}
        for i in range(64):
            info = self.info(hashlib.sha256(f"probe{i}".encode()).hexdigest())
            found[info["replica"]] = info
            if len(found) == 2:
                break
        return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _live(**changes: Any) -> None:
    """Change the running deployment's live configuration (a reconfigure in place)."""
    from workers import serve_cli

    serve_cli.deploy(serve_cli.apply_overrides(serve_cli.deployed_config(), live=changes), wait_s=120)


@pytest.fixture(scope="module")
def service(ray_local: str) -> Iterator[Service]:
    from ray import serve

    from workers import serve_cli

    port = _free_port()
    config = serve_cli.apply_overrides(
        serve_cli.base_config(host="127.0.0.1", port=port),
        replicas=2,
        num_cpus=0.25,
        live={
            "engine": "classic",
            "versions": {
                VERSION_B: {"engine": "classic"},
                SLOW: {"engine": "classic", "synthetic_embed_s": 3.0},
            },
        },
    )
    serve_cli.deploy(config, wait_s=180)
    try:
        yield Service(f"http://127.0.0.1:{port}/segment", port)
    finally:
        serve.delete("segmenter")
        serve.shutdown()


@pytest.fixture
def http_client(service: Service) -> Iterator[ServeSegmenter]:
    client = ServeSegmenter(service.url, timeout_s=60)
    yield client
    client.close()


# --- routing, without Ray --------------------------------------------------------------------------------
def test_rendezvous_order_moves_only_the_images_of_a_removed_replica() -> None:
    from workers.serve_router import rendezvous_order

    replicas = [f"r{i}" for i in range(5)]
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    before = {key: rendezvous_order(key, replicas)[0] for key in keys}
    assert rendezvous_order(keys[0], replicas) == rendezvous_order(keys[0], list(reversed(replicas)))
    counts = [list(before.values()).count(r) for r in replicas]
    assert min(counts) > 300  # ~400 each: balanced
    after = {key: rendezvous_order(key, replicas[:-1])[0] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(before[key] == "r4" for key in moved)  # only the removed replica's images moved
    assert len(moved) == counts[-1]


# --- the cache and the image protocol ------------------------------------------------------------------
def test_later_rounds_hit_the_cache_on_one_replica(service: Service) -> None:
    pic = picture(0)
    asked = service.segment(pic.body(image=False))
    assert asked["status"] == "need_image"  # never seen: the service asks for the pixels
    first = service.segment(pic.body(image=True))
    assert first["status"] == "ok" and first["cache_hit"] is False
    assert "embed_ms" in first["timings_ms"]
    replicas = {first["replica"]}
    for _ in range(3):  # later rounds: no pixels, a cache hit, on the replica that holds the image
        later = service.segment(pic.body(image=False))
        assert later["status"] == "ok" and later["cache_hit"] is True, later
        assert "embed_ms" not in later["timings_ms"]
        replicas.add(later["replica"])
    assert len(replicas) == 1
    assert pic.iou(Mask.from_coco_rle(later["segments"][0]["rle"]).data) > 0.8


def test_client_sends_pixels_once_and_follows_memory(service: Service, http_client: ServeSegmenter) -> None:
    pic = picture(1)
    handle = pic.handle()
    memory: list[RoundResult] = []
    for _ in range(3):
        segments = http_client.segment(handle, pic.click(), tuple(memory))
        memory.append(RoundResult(pic.click(), segments[0].mask, segments[0].score))
        assert pic.iou(segments[0].mask.data) > 0.8
        assert segments[0].model_version == "classic-1"
    assert len(pic.loads) == 1  # decoded pixels were needed for the first round only
    # A second backend process (a new client) on the same image: one need_image round trip at most.
    other = ServeSegmenter(service.url)
    other._shared.mark_sent(pic.sha256)  # as if it had sent them before: it sends none
    assert pic.iou(other.segment(pic.handle(), pic.click())[0].mask.data) > 0.8
    assert len(pic.loads) == 1  # the replica still had it: no pixels needed
    other.close()


def test_request_id_reaches_the_replica(service: Service, http_client: ServeSegmenter) -> None:
    """The backend's request id travels with the call (header and field); the replica echoes it."""
    from seemly.log_setup import bind_request_id

    pic = picture(217)  # an image no other test embeds
    with bind_request_id("req-serve-17"):
        assert pic.iou(http_client.segment(pic.handle(), pic.click())[0].mask.data) > 0.8
    assert http_client.last_answer["request_id"] == "req-serve-17"
    http_client.segment(pic.handle(), pic.click())  # outside a request: no id is sent
    assert http_client.last_answer["request_id"] is None
    junk = service.post("/v1/segment", pic.body(image=False, request_id="bad id\nforged"))
    assert junk.status_code == 400 and junk.json()["error"]["message"].startswith("request_id")


def test_affinity_spreads_images_over_replicas(service: Service) -> None:
    by_replica: dict[str, set[int]] = {}
    for index in range(100, 116):  # 16 images: all on one replica by chance would be p = 2^-15
        pic = picture(index)
        replicas = {service.segment(pic.body(image=True))["replica"]}
        replicas |= {service.segment(pic.body(image=False))["replica"] for _ in range(2)}
        assert len(replicas) == 1, f"rounds of picture {index} went to {replicas}"
        by_replica.setdefault(replicas.pop(), set()).add(index)
    assert len(by_replica) == 2, by_replica  # rendezvous hashing uses both replicas


def test_prefetch_embeds_ahead(service: Service, http_client: ServeSegmenter) -> None:
    pics = [picture(i) for i in (10, 11, 12)]
    statuses = [f.result(timeout=60) for f in http_client.prefetch([p.handle() for p in pics], wait=True)]
    assert statuses == ["embedded"] * 3
    assert [len(p.loads) for p in pics] == [1, 1, 1]
    for pic in pics:  # the annotator opens the task: the first round is already a cache hit
        answer = service.segment(pic.body(image=False))
        assert answer["status"] == "ok" and answer["cache_hit"] is True
    again = [f.result(timeout=60) for f in http_client.prefetch([pics[0].handle()], wait=True)]
    assert again == ["cached"] and len(pics[0].loads) == 1


def test_concurrent_embeds_share_a_batch(service: Service) -> None:
    _live(batch_wait_timeout_s=0.3)  # a wide window, so that the test does not depend on timing
    try:
        before = {r: i["embed_batches"]["count"] for r, i in service.replicas().items()}
        pics = [picture(i) for i in range(13, 19)]
        handle = service.handle()
        responses = [
            handle.prefetch.remote(
                {"sha256": p.sha256, "width": SIZE, "height": SIZE}, sha256=p.sha256, pixels=p.pixels
            )
            for p in pics
        ]
        assert {r.result(timeout_s=60)["status"] for r in responses} == {"embedded"}
        after = service.replicas()
        sizes = [s for info in after.values() for s in info["embed_batches"]["sizes"]]
        batches = sum(info["embed_batches"]["count"] for info in after.values()) - sum(before.values())
        assert batches < len(pics) and max(sizes) > 1, after  # 6 embeds in fewer batches
    finally:
        _live(batch_wait_timeout_s=0.005)


def test_eviction_under_a_tiny_budget(service: Service) -> None:
    _live(cache_mb=0.5)  # one 96 x 96 classic state is ~0.8 MB: each new image evicts the last
    try:
        pics, replica = [], None
        for index in range(50, 75):  # two pictures served by the same replica
            pic = picture(index)
            answer = service.segment(pic.body(image=True))
            assert answer["status"] == "ok"
            if replica is None or answer["replica"] == replica:
                replica = answer["replica"]
                pics.append(pic)
            if len(pics) == 2:
                break
        assert len(pics) == 2
        assert service.segment(pics[0].body(image=False))["status"] == "need_image"  # evicted
        assert service.segment(pics[1].body(image=False))["cache_hit"] is True  # the newest stays
        info = service.info(pics[1].sha256)
        assert info["cache"]["evictions"] >= 1
        assert info["cache"]["bytes"] <= 1024 * 1024 or info["cache"]["entries"] == 1
    finally:
        _live(cache_mb=1024)


# --- correctness under concurrency ---------------------------------------------------------------------------
def test_concurrent_sessions_never_mix_images(service: Service, http_client: ServeSegmenter) -> None:
    handle_client = ServeSegmenter("serve://segmenter", timeout_s=60)
    pics = [picture(25 + i) for i in range(16)]  # 16 distinct object positions (second grid pass)
    barrier = threading.Barrier(len(pics))

    def session(pic: Picture) -> list[float]:
        client = http_client if pic.index % 2 else handle_client
        barrier.wait()
        ious, memory = [], []
        for _ in range(3):
            segments = client.segment(pic.handle(), pic.click(), tuple(memory))
            memory.append(RoundResult(pic.click(), segments[0].mask, segments[0].score))
            ious.append(pic.iou(segments[0].mask.data))
        return ious

    with ThreadPoolExecutor(len(pics)) as pool:
        results = list(pool.map(session, pics))
    for pic, ious in zip(pics, results, strict=True):
        assert min(ious) > 0.8, f"picture {pic.index}: IoU with its own object {ious}"
    handle_client.close()


# --- model versions ------------------------------------------------------------------------------------------
def test_versions_side_by_side_and_promotion_under_load(
    service: Service, http_client: ServeSegmenter
) -> None:
    from workers import serve_cli

    actors_before = {i["actor_name"] for i in service.replicas().values()}
    pinned = http_client.for_version(VERSION_B)
    pic = picture(3)
    assert pinned.segment(pic.handle(), pic.click())[0].model_version == VERSION_B
    assert http_client.segment(pic.handle(), pic.click())[0].model_version == "classic-1"

    stop = threading.Event()
    failures: list[BaseException] = []
    versions: list[str] = []
    lock = threading.Lock()

    def annotator(index: int) -> None:
        pic = picture(40 + index)
        while not stop.is_set():
            try:
                version = http_client.segment(pic.handle(), pic.click())[0].model_version
                with lock:
                    versions.append(version)
            except BaseException as exc:
                with lock:
                    failures.append(exc)

    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        serve_cli.promote(VERSION_B)  # while the annotators click (what `seemly serve --promote` does)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if versions[-8:] == [VERSION_B] * 8:
                    break
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    try:
        assert not failures, failures[:3]
        assert "classic-1" in versions and versions[-8:] == [VERSION_B] * 8
        assert {i["actor_name"] for i in service.replicas().values()} == actors_before  # no restart
        assert (
            http_client.for_version("classic-1").segment(pic.handle(), pic.click())[0].model_version
            == "classic-1"
        )
    finally:
        serve_cli.promote(None)
    with pytest.raises(SystemExit, match="unknown model version"):
        serve_cli.promote("no-such-version")


def test_errors_are_typed_answers(service: Service, http_client: ServeSegmenter) -> None:
    pic = picture(4)
    outside = pic.body(image=True)
    outside["round"] = {"prompts": [{"kind": "click", "x": 500, "y": 5}]}
    response = service.post("/v1/segment", outside)
    assert response.status_code == 422 and response.json()["error"]["type"] == "prompt"
    assert "outside the image" in response.json()["error"]["message"]
    response = service.post("/v1/segment", pic.body(image=True, model_version="no-such-version"))
    assert response.status_code == 404 and "no-such-version" in response.json()["error"]["message"]
    response = service.post("/v1/segment", {**pic.body(image=False), "sha256": "xyz"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "bad_request"
    text = PromptRound(prompts=[{"kind": "text", "text": "cat"}])
    from seemly.engines.base import UnsupportedPromptError

    with pytest.raises(UnsupportedPromptError, match="cannot follow text"):
        http_client.segment(pic.handle(), text)
    with pytest.raises(EngineError, match="unknown model version"):
        http_client.for_version("no-such-version").segment(pic.handle(), pic.click())
    with pytest.raises(PromptError):
        bad = PromptRound(prompts=[Click(x=500, y=5)])
        http_client.segment(pic.handle(), bad)


def test_service_down_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_free_port()}/segment"
    client = ServeSegmenter(url, timeout_s=5)
    pic = picture(5)
    started = time.monotonic()
    with pytest.raises(SegmenterUnavailableError) as caught:
        client.segment(pic.handle(), pic.click())
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"the segmenter service at {url} is not reachable" in message
    assert "start it with `seemly serve`" in message
    assert client.model_version == "segmenter-unavailable"  # /health of the backend still answers
    with caplog.at_level(logging.ERROR, logger="backend.segmenter"):
        made = make_segmenter_client(Settings(segmenter_url=url))
    assert isinstance(made, ServeSegmenter)
    assert "seemly serve" in caplog.text
    client.close()
    made.close()


def test_no_application_is_a_clear_error(service: Service) -> None:
    wrong_path = ServeSegmenter(f"http://127.0.0.1:{service.port}/nothing-here", timeout_s=5)
    assert "no segmenter application is deployed there" in (wrong_path.probe() or "")
    missing = ServeSegmenter("serve://no-such-app", timeout_s=5)
    problem = missing.probe() or ""
    assert "not reachable" in problem and "seemly serve" in problem


# --- failures ---------------------------------------------------------------------------------------------
def test_killed_replica_is_replaced_and_requests_go_on(service: Service, http_client: ServeSegmenter) -> None:
    import ray
    from ray import serve

    # A request in flight on a replica that dies: retried elsewhere by the ingress, never a hang.
    slow_pic = picture(6)
    victim = service.info(slow_pic.sha256)
    outcome: dict[str, Any] = {}

    def in_flight() -> None:
        try:
            outcome["segments"] = http_client.for_version(SLOW).segment(slow_pic.handle(), slow_pic.click())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(1.0)  # the 3 s embed has started on the victim
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    thread.join(90)
    assert not thread.is_alive(), "the in-flight request hung"
    assert "error" not in outcome, outcome.get("error")
    assert slow_pic.iou(outcome["segments"][0].mask.data) > 0.8

    # The next request on an image of the dead replica succeeds (re-embedded where it lands now).
    pic = picture(7)
    assert pic.iou(http_client.segment(pic.handle(), pic.click())[0].mask.data) > 0.8
    victim = service.info(pic.sha256)
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    started = time.monotonic()
    assert pic.iou(http_client.segment(pic.handle(), pic.click())[0].mask.data) > 0.8
    assert time.monotonic() - started < 60

    # Serve replaces the dead replicas.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        replicas = service.replicas()
        status = serve.status().applications["segmenter"].deployments["Segmenter"]
        actors = {i["actor_name"] for i in replicas.values()}
        if len(replicas) == 2 and victim["actor_name"] not in actors and status.status == "HEALTHY":
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"the killed replica was not replaced: {status}")


# --- the backend on the Serve segmenter ----------------------------------------------------------------------
def test_backend_predicts_through_the_service(
    service: Service, postgres_db: Any, postgres_url: str, tmp_path: Any
) -> None:
    """``seemly backend`` with ``SEEMLY_SEGMENTER_URL`` set: Label Studio JSON in, a mask computed by a
    Segmenter replica out; the second round finds the embedding (one download, one embed)."""
    from backend.app import BackendOptions, backend_of, create_app
    from tests.backend_support import brush_mask, interactive_body, keypoint, make_scene, only_brush, save

    images = tmp_path / "images"
    images.mkdir()
    settings = Settings(database_url=postgres_url, file_roots=[str(images)], segmenter_url=service.url)
    segmenter = make_segmenter_client(settings)
    assert isinstance(segmenter, ServeSegmenter)
    app = create_app(settings, db=postgres_db, segmenter=segmenter, options=BackendOptions(warm_up=False))
    app.testing = False
    backend = backend_of(app)
    try:
        client = app.test_client()
        scene = make_scene(31)
        uri = save(scene, images, "serve.png")
        cx, cy = scene.pct("cat")
        for dx in (0.0, 3.0):
            response = client.post("/predict", json=interactive_body(5, uri, [keypoint(scene, cx + dx, cy)]))
            assert response.status_code == 200, response.json
            mask = brush_mask(only_brush(response.json["results"][0]))
            assert mask.iou(scene.truth["cat"]) > 0.8
            assert segmenter.last_answer["replica"]
        assert segmenter.last_answer["cache_hit"] is True and segmenter.last_answer["pixels_sent"] is False
        assert backend.fetcher.fetches == 1
        assert client.get("/health").json["model_version"] == "classic-1"
    finally:
        backend.history.close()
        segmenter.close()
        logging.getLogger("backend").handlers.clear()  # what create_app installed (as backend_support does)

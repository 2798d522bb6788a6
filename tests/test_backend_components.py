"""The backend's moving parts on their own: session store, embedding cache, history writer, log filter."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, Engine, func, select

from backend.history import HistoryWriter, TrainingRequestRecord, WriterContext
from backend.logs import RedactSecrets
from backend.segmenter import ImageChangedError, ImageHandle, InProcessSegmenter
from backend.sessions import SessionKey, SessionStore
from seemly.db.models import TrainingRequest
from seemly.engines.base import Engine as SegEngine
from seemly.engines.base import ImageState, Segment
from seemly.images import DecodedImage
from seemly.masks import Mask

# --- sessions ----------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _open(store: SessionStore, key: SessionKey, sha: str = "a" * 64, **kw: Any):
    return store.open(key, sha256=sha, width=4, height=3, uri="file:///x", **kw)


def test_session_rules() -> None:
    clock = Clock()
    store = SessionStore(max_sessions=2, idle_seconds=10, clock=clock)
    key = SessionKey(1, 1, "ann")
    first = _open(store, key, label="cat")
    first.session.add(_round(), Mask.empty(3, 4))
    assert _open(store, key, label="cat") is first  # same object
    assert _open(store, key, label=None) is first  # a prompt without label keeps it
    assert _open(store, key, label="dog") is not first  # another class: a new object
    second = _open(store, key, label="dog")
    assert _open(store, key, sha="b" * 64) is not second  # another image
    third = _open(store, key, sha="b" * 64)
    clock.now = 11
    assert _open(store, key, sha="b" * 64) is not third  # idle too long
    # LRU bound
    _open(store, SessionKey(1, 2, "ann"))
    _open(store, SessionKey(1, 3, "ann"))
    assert len(store) == 2 and store.get(key) is None
    assert store.drop_task(1, 3) == 1 and len(store) == 1


def test_text_prompt_per_project_and_annotator() -> None:
    store = SessionStore(max_texts=2)
    store.set_text(1, "a", "cat")
    store.set_text(2, "a", "dog")
    assert store.text(1, "a") == "cat" and store.text(2, "a") == "dog" and store.text(1, "b") is None
    store.set_text(1, "a", "")
    assert store.text(1, "a") is None
    store.set_text(3, "a", "x")
    store.set_text(4, "a", "y")
    assert store.text(2, "a") is None  # LRU-bounded


# --- embedding cache --------------------------------------------------------------------------------------------


@dataclass
class FakeState(ImageState):
    pixels: np.ndarray | None = None


class FakeEngine(SegEngine):
    """Embeds slowly into a state of a known size; segments instantly."""

    name = "fake"
    version = "1"

    def __init__(self, state_bytes: int = 1000, embed_seconds: float = 0.0) -> None:
        self.state_bytes = state_bytes
        self.embed_seconds = embed_seconds
        self.embeds: list[str] = []
        self.lock = threading.Lock()

    def embed(self, image: np.ndarray, sha256: str) -> FakeState:
        time.sleep(self.embed_seconds)
        with self.lock:
            self.embeds.append(sha256)
        return FakeState(sha256, self.model_version, 2, 2, pixels=np.zeros(self.state_bytes, np.uint8))

    def segment(self, state, prompt_round, memory=()):
        return [Segment(Mask.full(2, 2), 1.0, self.model_version)]

    def segment_everything(self, state):
        raise NotImplementedError("no proposals")


def _handle(sha: str, loads: list[str] | None = None, actual: str | None = None) -> ImageHandle:
    def load() -> DecodedImage:
        if loads is not None:
            loads.append(sha)
        return DecodedImage(np.zeros((2, 2, 3), np.uint8), actual or sha, 2, 2, "PNG")

    return ImageHandle(sha, 2, 2, f"file:///{sha}", load)


def _round():
    from seemly.prompts import PromptRound

    return PromptRound.model_validate({"prompts": [{"kind": "click", "x": 1, "y": 1}]})


def test_cache_is_lru_within_its_budget() -> None:
    engine = FakeEngine(state_bytes=1000)
    segmenter = InProcessSegmenter(engine, cache_bytes=2500)
    loads: list[str] = []
    for sha in ("a", "b", "a", "c", "a", "b"):
        segmenter.segment(_handle(sha, loads), _round())
    # a, b cached; a hit; c evicts b (LRU); a hit; b again evicts c
    assert engine.embeds == ["a", "b", "c", "b"]
    assert loads == ["a", "b", "c", "b"]  # pixels are loaded only on a miss
    assert segmenter.stats.hits == 2 and segmenter.stats.evictions == 2
    assert segmenter.cached_bytes <= 2500


def test_concurrent_first_requests_embed_once() -> None:
    engine = FakeEngine(embed_seconds=0.2)
    segmenter = InProcessSegmenter(engine)
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        segmenter.segment(_handle("same"), _round())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.embeds == ["same"]


def test_changed_image_and_missing_everything() -> None:
    from seemly.engines.base import EngineError

    segmenter = InProcessSegmenter(FakeEngine())
    with pytest.raises(ImageChangedError):
        segmenter.segment(_handle("old", actual="new"), _round())
    assert not segmenter.cached("old")  # the failed placeholder is gone
    with pytest.raises(EngineError, match="cannot segment a whole image"):
        segmenter.segment_everything(_handle("x"))


# --- history writer -----------------------------------------------------------------------------------------------


@dataclass
class Boom:
    kind: str = "boom"

    def apply(self, conn: Connection, ctx: WriterContext) -> None:
        raise ValueError("this record is broken\nSQL parameters that must not be logged")


def test_one_bad_record_does_not_lose_the_batch(
    postgres_db: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    writer = HistoryWriter(postgres_db, WriterContext(None, None, "classic"), max_delay=0.2)
    writer.submit(TrainingRequestRecord(ls_project_id=5))
    writer.submit(Boom())
    writer.submit(TrainingRequestRecord(ls_project_id=6))
    assert writer.flush(30)
    with postgres_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(TrainingRequest)).scalar_one() == 2
    assert writer.stats.written == 2 and writer.stats.failed == 1
    assert "this record is broken" in caplog.text and "must not be logged" not in caplog.text
    writer.close()


def test_full_queue_drops_instead_of_blocking(postgres_db: Engine) -> None:
    writer = HistoryWriter(postgres_db, WriterContext(None, None, "classic"), max_queue=1)
    gate = threading.Event()

    @dataclass
    class Slow:
        kind: str = "slow"

        def apply(self, conn: Connection, ctx: WriterContext) -> None:
            gate.wait(10)

    assert writer.submit(Slow())
    time.sleep(0.2)  # the writer thread holds the first record
    assert writer.submit(Slow())  # fills the queue
    started = time.perf_counter()
    assert not writer.submit(Slow())  # full: dropped at once
    assert time.perf_counter() - started < 0.1
    assert writer.stats.dropped == 1
    gate.set()
    assert writer.flush(30)
    writer.close()


# --- log filter ---------------------------------------------------------------------------------------------------


def test_redaction_filter() -> None:
    redactor = RedactSecrets()

    def secrets() -> list[str]:
        return ["tok-12345678"]

    redactor.add_source(secrets)
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "token %s and Authorization: Basic bHM6cGFzc3dvcmQ=",
        ("tok-12345678",),
        None,
    )
    redactor.filter(record)
    assert record.getMessage() == "token *** and Authorization: Basic ***"

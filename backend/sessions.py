"""Per-annotator interactive memory: one object session per (project, task, annotator).

Label Studio's frontend sends, with each interactive request, the region just drawn plus the other
smart regions of the same type and label (its "group"), and nothing else: a box and the clicks come
in separate requests, and once a suggestion is accepted its prompt regions are deleted and never
sent again. So the backend keeps the rounds itself. A session holds the rounds on one object of one
image, and the region ids already used (``known``); the engine receives the rounds as memory and
refines the last mask. How a request extends a session is decided in :mod:`backend.predict`:

* new region ids only: one more round with just the new prompts (the usual click-by-click case,
  also after an accept has deleted the earlier prompt regions);
* a known region moved, or a group came back smaller (a region was deleted): the session starts
  over with the prompts as they are now;
* the same group again, unchanged: the last answer is repeated, nothing is recomputed.

A session also starts over (a new object) when:

* the task's image changed (another sha256), or the session was idle for ``idle_seconds``;
* the round brings a new region prompt (box, polygon, brush mask): it describes a whole object;
* the object's label changes (the annotator switched class, or a text prompt named another label);
* the task's annotation was submitted (:meth:`SessionStore.drop_task`, from the webhook).

A text prompt is remembered per (project, annotator), not per task: it stays active on the next
tasks until the annotator types another one (or clears it).

Everything is bounded (LRU) and thread-safe. Nothing is process-global: sessions live in a store
owned by the app, and two annotators on different tasks can never see each other's session.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from seemly.prompts import Session


class SessionKey(NamedTuple):
    project: int
    task: int
    annotator: str


@dataclass
class ObjectSession:
    """The rounds on one object. Hold ``lock`` while reading or extending the rounds."""

    key: SessionKey
    session: Session
    uri: str
    label: str | None = None
    session_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Stable id of this session in the history tables (prompt_sessions.session_key)."""
    last_used: float = 0.0
    known: dict[str, Any] = field(default_factory=dict)
    """Label Studio region id -> the :class:`~backend.ls_format.ContextItem` already in the rounds."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def rounds(self) -> int:
        return len(self.session.rounds)


class SessionStore:
    """LRU-bounded, idle-expiring map of :class:`SessionKey` -> :class:`ObjectSession`."""

    def __init__(
        self,
        max_sessions: int = 2000,
        idle_seconds: float = 3600.0,
        max_texts: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or max_texts < 1:
            raise ValueError("max_sessions and max_texts must be positive")
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.max_texts = max_texts
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[SessionKey, ObjectSession] = OrderedDict()
        self._texts: OrderedDict[tuple[int, str], str] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(
        self,
        key: SessionKey,
        *,
        sha256: str,
        width: int,
        height: int,
        uri: str,
        new_object: bool = False,
        label: str | None = None,
    ) -> ObjectSession:
        """The session to extend with this round: the current one, or a fresh one (see module doc)."""
        now = self._clock()
        with self._lock:
            current = self._sessions.get(key)
            if (
                current is not None
                and current.session.image_sha256 == sha256
                and now - current.last_used <= self.idle_seconds
                and not (new_object and current.rounds)
                and (label is None or current.label is None or label == current.label)
            ):
                current.last_used = now
                if label is not None and current.label is None:
                    current.label = label
                self._sessions.move_to_end(key)
                return current
            fresh = ObjectSession(
                key=key, session=Session(sha256, width, height), uri=uri, label=label, last_used=now
            )
            self._sessions[key] = fresh
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return fresh

    def get(self, key: SessionKey) -> ObjectSession | None:
        with self._lock:
            return self._sessions.get(key)

    def drop(self, key: SessionKey) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def drop_task(self, project: int, task: int) -> int:
        """Forget every session on a task (its annotation was submitted); returns how many."""
        with self._lock:
            doomed = [k for k in self._sessions if k.project == project and k.task == task]
            for k in doomed:
                del self._sessions[k]
            return len(doomed)

    # --- text prompts: per (project, annotator), across tasks ---------------------------------------

    def text(self, project: int, annotator: str) -> str | None:
        with self._lock:
            return self._texts.get((project, annotator))

    def set_text(self, project: int, annotator: str, text: str | None) -> None:
        """Make ``text`` the annotator's active text prompt (``None`` or ``""`` clears it)."""
        with self._lock:
            key = (project, annotator)
            if not text:
                self._texts.pop(key, None)
                return
            self._texts[key] = text
            self._texts.move_to_end(key)
            while len(self._texts) > self.max_texts:
                self._texts.popitem(last=False)

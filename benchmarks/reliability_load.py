"""Simulated annotators for ``benchmarks/reliability.py``: Label Studio-shaped click sessions against
the backend's ``/predict`` and ``/webhook`` (loopback HTTP only), and the database checks after.

Each annotator is a thread working its own sequence of images (synthetic photo-like scenes with a
known object, ``file://`` PNGs): ``rounds`` clicks per image chosen by RITM's click simulator from
the mask the backend answered, each click sent as Label Studio's frontend sends it (the whole group
of key points so far in ``context.result``), a think time between clicks, then the annotation
submitted as Label Studio's ``ANNOTATION_CREATED`` webhook (the last mask as a brush region), which
becomes a correction row. Every request is timed and every non-200 answer kept with its message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from interactive_latency import make_scene  # benchmarks/ is sys.path[0] when run as a script
from PIL import Image as PILImage
from sqlalchemy import Engine, text

from seemly.bench.simulator import SimClick, next_click
from seemly.masks import Mask
from seemly.storage import path_to_uri
from tests.backend_support import BRUSH_CONFIG, PROJECT, PROJECT_ID, interactive_body

WIDTH, HEIGHT = 481, 321
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Call:
    """One request as an annotator saw it."""

    kind: str  # "first" | "later" | "submit"
    annotator: int
    task: int
    round: int
    started: float  # monotonic
    ms: float
    status: int  # HTTP status, 0 = no answer (connection error / timeout)
    error: str = ""


@dataclass
class LoadResult:
    calls: list[Call] = field(default_factory=list)
    sessions: int = 0  # images on which at least one round succeeded
    submitted: int = 0  # annotations accepted by /webhook
    elapsed_s: float = 0.0
    started: float = 0.0

    @property
    def errors(self) -> list[Call]:
        return [c for c in self.calls if c.status != 200]


class ImagePool:
    """Scenes saved as PNG under ``root`` on first use (one per (annotator, index)); thread-safe."""

    def __init__(self, root: Path, salt: str) -> None:
        self.root, self.salt = root, salt
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def get(self, annotator: int, index: int) -> tuple[str, np.ndarray]:
        scene = make_scene(10_000 * annotator + index, WIDTH, HEIGHT, self.salt)
        path = self.root / f"{self.salt}-a{annotator}-{index:04d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            PILImage.fromarray(scene.pixels).save(tmp, format="PNG", compress_level=1)
            tmp.replace(path)
        return path_to_uri(path), scene.truth


def _keypoint(click: SimClick, ident: str) -> dict[str, Any]:
    x_pct, y_pct = (click.col + 0.5) * 100.0 / WIDTH, (click.row + 0.5) * 100.0 / HEIGHT
    return {
        "id": ident,
        "from_name": "point" if click.positive else "point_negative",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": ["cat"]},
        "is_positive": click.positive,
    }


def _annotation_event(annotation_id: int, task_id: int, uri: str, mask: Mask, user: int) -> dict[str, Any]:
    region = {
        "id": f"r{annotation_id}",
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask.to_ls_brush_rle(), "brushlabels": ["cat"]},
    }
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": annotation_id,
            "result": [region],
            "task": task_id,
            "project": PROJECT_ID,
            "completed_by": user,
            "was_cancelled": False,
        },
        "task": {"id": task_id, "data": {"image": uri}, "project": PROJECT_ID},
        "project": {"id": PROJECT_ID, "label_config": BRUSH_CONFIG, "title": "reliability"},
    }


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error") or body)[:300]
    except ValueError:
        return response.text[:300]


def run_annotators(
    backend_url: str,
    pool: ImagePool,
    *,
    annotators: int,
    duration_s: float,
    rounds: int,
    think_s: float,
    task_base: int,
    on_call: Callable[[Call], None] | None = None,
) -> LoadResult:
    """``annotators`` threads clicking for ``duration_s`` (an image in progress is finished)."""
    result = LoadResult(started=time.monotonic())
    lock = threading.Lock()
    stop_at = result.started + duration_s

    def record(call: Call) -> None:
        with lock:
            result.calls.append(call)
        if on_call is not None:
            on_call(call)

    def annotator(a: int) -> None:
        session = requests.Session()
        user = f"annotator{a}@example.com"
        index = 0
        while time.monotonic() < stop_at:
            task_id = task_base + 10_000 * a + index
            uri, truth = pool.get(a, index)
            index += 1
            pred = np.zeros_like(truth)
            not_clicked = np.ones(truth.shape, np.float32)
            points: list[dict[str, Any]] = []
            answered = 0
            for number in range(1, rounds + 1):
                click = next_click(truth, pred, None, not_clicked)
                if click is None:  # perfect already: the object's centre again, as a new point
                    rows, cols = np.nonzero(truth)
                    click = SimClick(int(np.median(rows)), int(np.median(cols)), True)
                not_clicked[click.row, click.col] = 0
                points.append(_keypoint(click, f"a{a}t{task_id}k{number}"))
                body = interactive_body(task_id, uri, list(points), user=user, project=PROJECT)
                started = time.monotonic()
                kind = "first" if number == 1 else "later"
                try:
                    response = session.post(f"{backend_url}/predict", json=body, timeout=REQUEST_TIMEOUT_S)
                except requests.RequestException as exc:
                    record(
                        Call(
                            kind, a, task_id, number, started, (time.monotonic() - started) * 1e3, 0, str(exc)
                        )
                    )
                    break
                ms = (time.monotonic() - started) * 1e3
                if response.status_code != 200:
                    record(
                        Call(kind, a, task_id, number, started, ms, response.status_code, _message(response))
                    )
                    break
                record(Call(kind, a, task_id, number, started, ms, 200))
                answered += 1
                brush = [r for r in response.json()["results"][0]["result"] if r["type"] == "brushlabels"]
                pred = Mask.from_ls_brush_rle(brush[0]["value"]["rle"], HEIGHT, WIDTH).data if brush else pred
                if think_s and number < rounds:
                    time.sleep(think_s)
            if not answered:
                continue
            with lock:
                result.sessions += 1
            event = _annotation_event(task_id, task_id, uri, Mask(pred.astype(bool)), a + 1)
            started = time.monotonic()
            try:
                response = session.post(f"{backend_url}/webhook", json=event, timeout=REQUEST_TIMEOUT_S)
                status, error = response.status_code, "" if response.ok else _message(response)
            except requests.RequestException as exc:
                status, error = 0, str(exc)
            record(
                Call("submit", a, task_id, rounds, started, (time.monotonic() - started) * 1e3, status, error)
            )
            if status == 200:
                with lock:
                    result.submitted += 1
            if think_s:
                time.sleep(think_s)

    with ThreadPoolExecutor(annotators, thread_name_prefix="annotator") as threads:
        list(threads.map(annotator, range(annotators)))
    result.elapsed_s = time.monotonic() - result.started
    return result


# --- statistics -------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def latency_row(calls: list[Call]) -> dict[str, float]:
    ms = [c.ms for c in calls if c.status == 200]
    return {
        "n": len(ms),
        "p50": pct(ms, 0.5),
        "p90": pct(ms, 0.9),
        "p99": pct(ms, 0.99),
        "max": max(ms, default=0),
    }


# --- what the database holds afterwards ---------------------------------------------------------------------
def wait_for_history(
    db: Engine, expected_rounds: int, expected_corrections: int, timeout_s: float = 120
) -> None:
    """Wait until the backend's background writer has stored what was answered (or stopped moving)."""
    deadline, last, still = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        now = counts(db)
        if now["rounds"] >= expected_rounds and now["corrections"] >= expected_corrections:
            return
        still = still + 1 if now == last else 0
        if still >= 20:  # 10 s without progress: report what is there
            return
        last = now
        time.sleep(0.5)


def counts(db: Engine) -> dict[str, int]:
    """Rows, distinct keys and holes of what the interactive traffic writes (SQL, checked in the doc)."""
    with db.connect() as conn:
        rounds, round_keys = conn.execute(
            text("SELECT count(*), count(DISTINCT (session_id, round_index)) FROM prompt_rounds")
        ).one()
        sessions, session_keys = conn.execute(
            text("SELECT count(*), count(DISTINCT session_key) FROM prompt_sessions")
        ).one()
        # a hole: a session whose round indexes are not contiguous (a round lost in the middle)
        holes = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT session_id FROM prompt_rounds GROUP BY session_id "
                "HAVING max(round_index) - min(round_index) + 1 <> count(*)) AS s"
            )
        ).scalar_one()
        corrections, correction_keys = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT (project_id, ls_annotation_id, ls_region_id)) FROM corrections"
            )
        ).one()
        paired = conn.execute(
            text("SELECT count(*) FROM corrections WHERE predicted_rle IS NOT NULL")
        ).scalar_one()
    return {
        "rounds": int(rounds),
        "round_keys": int(round_keys),
        "sessions": int(sessions),
        "session_keys": int(session_keys),
        "round_holes": int(holes),
        "corrections": int(corrections),
        "correction_keys": int(correction_keys),
        "corrections_with_prediction": int(paired),
    }


def db_check(db: Engine, load: LoadResult, before: dict[str, int] | None = None) -> dict[str, Any]:
    """Expected (from the answers the annotators got) vs stored rows: lost and duplicated, per kind."""
    base = before or dict.fromkeys(counts(db), 0)
    ok_rounds = sum(1 for c in load.calls if c.kind != "submit" and c.status == 200)
    wait_for_history(db, base["rounds"] + ok_rounds, base["corrections"] + load.submitted)
    now = counts(db)
    delta = {k: now[k] - base[k] for k in now}
    return {
        "rounds_answered": ok_rounds,
        "rounds_stored": delta["rounds"],
        "rounds_lost": ok_rounds - delta["rounds"],
        "rounds_duplicated": now["rounds"] - now["round_keys"],
        "round_holes": now["round_holes"],
        "sessions_expected": load.sessions,
        "sessions_stored": delta["sessions"],
        "corrections_submitted": load.submitted,
        "corrections_stored": delta["corrections"],
        "corrections_lost": load.submitted - delta["corrections"],
        "corrections_duplicated": now["corrections"] - now["correction_keys"],
        "corrections_with_prediction": delta["corrections_with_prediction"],
    }

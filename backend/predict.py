"""``/predict``: interactive rounds (the request carries ``params.context``) and batch pre-annotation.

Interactive: the one task's image is resolved (downloaded only the first time), the context's
regions become pixel prompts (:mod:`backend.ls_format`), the annotator's session supplies the
earlier rounds as memory (:mod:`backend.sessions`), the segmenter answers, and the round is queued
for the history writer. No database access on this path, except reading the project's promoted
model version once per ``SEEMLY_VERSION_REFRESH_S`` (:mod:`backend.versions`); every request is
answered, and stored, with that one version.

Batch: for each task, masks a bucket job already stored for the image and the current model
version are returned at once (:mod:`backend.stored_masks`); otherwise the image is segmented with
``segment_everything`` and the proposals are stored the same way for next time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from backend import compat, ls_format, observability, stored_masks
from backend.errors import ApiError, from_exception
from backend.fetch import ImageFetcher
from backend.history import HistoryWriter, PredictedMasksRecord, RoundRecord
from backend.ls_format import ContextItem
from backend.projects import ProjectRegistry
from backend.segmenter import ImageChangedError, ImageHandle, SegmenterClient
from backend.sessions import ObjectSession, SessionKey, SessionStore
from backend.versions import ProjectVersions
from plugin.labeling_config import ParsedConfig
from seemly.engines.base import Segment, UnsupportedPromptError
from seemly.engines.semantic import ProjectSemantics
from seemly.prompts import PromptError, PromptRound, RoundResult, parse_round

log = logging.getLogger(__name__)

MAX_BATCH_TASKS = 1000


class Predictor:
    def __init__(
        self,
        *,
        segmenter: SegmenterClient,
        fetcher: ImageFetcher,
        sessions: SessionStore,
        projects: ProjectRegistry,
        history: HistoryWriter,
        db: Engine,
        semantic: ProjectSemantics | None = None,
        versions: ProjectVersions | None = None,
    ) -> None:
        self.segmenter = segmenter
        # the project's promoted model version (hot swap); None: every project gets ``segmenter``
        self.versions = versions
        self.fetcher = fetcher
        self.sessions = sessions
        self.projects = projects
        self.history = history
        self.db = db
        # text and reference prompts: per-project labels + label model over the same segmenter
        self.semantic = semantic or ProjectSemantics(
            db, fetcher.storage, image_loader=lambda uri: fetcher.load(uri).array
        )

    @property
    def model_version(self) -> str:
        return self.segmenter.model_version

    def segmenter_for(self, ls_pid: int) -> SegmenterClient:
        """The segmenter of the project's promoted version (the default one without a registry)."""
        if self.versions is None:
            return self.segmenter
        return self.segmenter.for_version(self.versions.resolve(ls_pid))

    def predict(self, body: Mapping[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise PromptError("tasks", "must be a non-empty list of Label Studio tasks")
        if len(tasks) > MAX_BATCH_TASKS:
            raise PromptError("tasks", f"{len(tasks)} tasks in one request, at most {MAX_BATCH_TASKS}")
        for index, task in enumerate(tasks):
            if not isinstance(task, Mapping):
                raise PromptError(f"tasks[{index}]", "every task must be a JSON object")
        ls_pid = ls_format.ls_project_id(body.get("project"))
        config = self.projects.config_for(ls_pid, body.get("label_config"))
        params = body.get("params") or {}
        if not isinstance(params, Mapping):
            raise PromptError("params", "must be a JSON object")
        context = params.get("context")
        if context is not None and not isinstance(context, Mapping):
            raise PromptError("params.context", "must be a JSON object with a 'result' list")
        self.projects.ensure_label_studio(ls_pid)
        segmenter = self.segmenter_for(ls_pid)  # one version for the whole request
        if context:
            if len(tasks) != 1:
                raise PromptError(
                    "tasks", f"an interactive request must carry exactly one task, got {len(tasks)}"
                )
            try:
                prediction = self.interactive(ls_pid, config, tasks[0], params, context, segmenter)
            except ImageChangedError:
                self.fetcher.forget(ls_format.image_uri(tasks[0], config))
                prediction = self.interactive(ls_pid, config, tasks[0], params, context, segmenter)
            return compat.predict_body([prediction], segmenter.model_version)
        return compat.predict_body(self.batch(ls_pid, config, tasks, segmenter), segmenter.model_version)

    # --- interactive ---------------------------------------------------------------------------------

    def interactive(
        self,
        ls_pid: int,
        config: ParsedConfig,
        task: Mapping[str, Any],
        params: Mapping[str, Any],
        context: Mapping[str, Any],
        segmenter: SegmenterClient | None = None,
    ) -> dict[str, Any]:
        segmenter = segmenter or self.segmenter
        version = segmenter.model_version
        task_id = ls_format.task_id(task, "tasks[0]")
        uri = ls_format.image_uri(task, config)
        annotator = ls_format.annotator_of(params, context, task)
        handle, info = self.fetcher.resolve(uri)
        parsed = ls_format.parse_context(context, config, handle.width, handle.height)
        if parsed.label is not None and parsed.label not in config.labels:
            raise ApiError(
                422,
                f"label {parsed.label!r} has no counterpart in the <{config.output.kind} "
                f'name="{config.output.name}"> tag ({", ".join(config.labels)})',
                "params.context.result",
            )
        key = SessionKey(ls_pid, task_id, annotator)
        if parsed.empty:
            # The annotator deleted the last smart region of a group: nothing to segment, and the
            # object those prompts described is gone.
            self.sessions.drop(key)
            return ls_format.prediction([], config, version)
        if parsed.text is not None:
            self.sessions.set_text(ls_pid, annotator, parsed.text)
        text = self.sessions.text(ls_pid, annotator)
        # The object's class: named by the text prompt if it names a label ("kitty" names cat, see
        # seemly.text_labels), else by the prompts.
        object_label = (self.semantic.label_for_text(config.labels, text) if text else None) or parsed.label
        label = object_label if object_label is not None else (config.labels[0] if config.labels else None)
        run = _Round(
            self, segmenter, ls_pid, task_id, annotator, uri, handle, info, text, label, config.labels
        )
        where = dict(sha256=handle.sha256, width=handle.width, height=handle.height, uri=uri)

        if not parsed.items:
            if not text:  # the text prompt was cleared and nothing else was sent
                return ls_format.prediction([], config, version)
            # A text-only round names a (new) object; the session starts over only if the engine
            # accepts it, so a refused text prompt does not cost the annotator their clicks.
            segments, latency_ms = run.segment([], ())
            session = self.sessions.open(key, **where, new_object=True, label=None)
            with session.lock:
                best = run.remember(session, [], segments, latency_ms)
            return ls_format.prediction([best], config, version, label=label)

        session = self.sessions.open(key, **where, label=object_label)
        with session.lock:
            plan, items = _plan(session, parsed)
            if plan == "repeat":
                last = session.session.rounds[-1]
                repeated = Segment(last.mask, last.score, version, label)
                return ls_format.prediction([repeated], config, version, label=label)
            if plan == "append":
                segments, latency_ms = run.segment(items, session.session.memory)
                best = run.remember(session, items, segments, latency_ms)
        if plan == "restart":
            session = self.sessions.open(key, **where, new_object=True, label=object_label)
            with session.lock:
                segments, latency_ms = run.segment(items, ())
                best = run.remember(session, items, segments, latency_ms)
        return ls_format.prediction([best], config, version, label=label)

    @staticmethod
    def _best(segments: Sequence[Segment]) -> Segment:
        if not segments:
            raise ApiError(503, "the segmentation engine returned no mask")
        return segments[0]

    # --- batch ----------------------------------------------------------------------------------------

    def batch(
        self,
        ls_pid: int,
        config: ParsedConfig,
        tasks: Sequence[Mapping[str, Any]],
        segmenter: SegmenterClient | None = None,
    ) -> list[dict[str, Any]]:
        segmenter = segmenter or self.segmenter
        # Structural problems (no id, no image field) are the caller's mistake for every task: 4xx.
        jobs = []
        for index, task in enumerate(tasks):
            path = f"tasks[{index}]"
            jobs.append((ls_format.task_id(task, path), ls_format.image_uri(task, config, path)))
        out = []
        for task_id, uri in jobs:
            try:
                segments = self._batch_one(ls_pid, task_id, uri, segmenter)
            except ImageChangedError:
                self.fetcher.forget(uri)
                segments = self._batch_one(ls_pid, task_id, uri, segmenter)
            except Exception as exc:
                error = from_exception(exc)
                if error is None or len(jobs) == 1:
                    raise
                # One unreadable image must not cost the other tasks their predictions.
                log.warning("batch prediction for task %s failed: %s", task_id, error.message)
                segments = []
            out.append(ls_format.prediction(segments, config, segmenter.model_version))
        return out

    def _batch_one(self, ls_pid: int, task_id: int, uri: str, segmenter: SegmenterClient) -> list[Segment]:
        version = segmenter.model_version
        known = self.fetcher.known(uri)
        try:
            if known is not None:
                stored = stored_masks.by_sha256(self.db, ls_pid, known.sha256, version)
            else:
                found = stored_masks.by_uri(self.db, ls_pid, uri, version)
                stored = found[1] if found else None
        except SQLAlchemyError as exc:  # the database is optional for answering: segment instead
            log.warning("stored-mask lookup failed (%s); segmenting instead", type(exc).__name__)
            stored, known = None, self.fetcher.known(uri)
        if stored:
            return stored
        handle, info = self.fetcher.resolve(uri)
        if known is None:
            try:
                stored = stored_masks.by_sha256(self.db, ls_pid, handle.sha256, version)
            except SQLAlchemyError as exc:
                log.warning("stored-mask lookup failed (%s); segmenting instead", type(exc).__name__)
            if stored:
                return stored
        segments = segmenter.segment_everything(handle)
        self.history.submit(
            PredictedMasksRecord(
                ls_project_id=ls_pid,
                ls_task_id=task_id,
                image=info,
                uri=uri,
                segments=list(segments),
                model_version=version,
            )
        )
        return segments


def _plan(session: ObjectSession, parsed: ls_format.ParsedContext) -> tuple[str, list[ContextItem]]:
    """How this request extends the session (see :mod:`backend.sessions`): ``append`` the new
    prompts as one more round, ``restart`` the object with the given prompts, or ``repeat``."""
    items = parsed.items
    if not session.rounds:
        return "append", items
    if any(item.region_id is None for item in items):  # a client without region ids: every prompt is new
        return ("restart" if parsed.region_prompt else "append"), items
    known = session.known
    new = [item for item in items if item.region_id not in known]
    moved = [
        item for item in items if item.region_id in known and known[item.region_id].prompt != item.prompt
    ]
    groups = {item.group for item in items}
    if moved or not new:
        same_group = {rid for rid, item in known.items() if item.group in groups}
        if not moved and {item.region_id for item in items} == same_group:
            return "repeat", []
        # moved or deleted regions: start over with the prompts as they are now
        others = [item for item in known.values() if item.group not in groups]
        return "restart", others + items
    if any(item.is_region for item in new):
        return "restart", new  # a new box / polygon / mask: a new object
    return "append", new


class _Round:
    """Running one round of an interactive request and remembering it (session + history)."""

    def __init__(
        self,
        predictor: Predictor,
        segmenter: SegmenterClient,
        ls_pid: int,
        task_id: int,
        annotator: str,
        uri: str,
        handle: ImageHandle,
        info: Any,
        text: str | None,
        label: str | None,
        labels: Sequence[str] = (),
    ) -> None:
        self.p, self.segmenter = predictor, segmenter
        self.ls_pid, self.task_id, self.annotator = ls_pid, task_id, annotator
        self.uri, self.handle, self.info, self.text, self.label = uri, handle, info, text, label
        self.labels = list(labels)
        self.prompt_round: PromptRound | None = None
        self.used_round: PromptRound | None = None

    def segment(
        self, items: Sequence[ContextItem], memory: Sequence[RoundResult]
    ) -> tuple[list[Segment], float]:
        """Segment the prompts (plus the active text); ``prompt_round`` is what the annotator asked,
        ``used_round`` what the engine followed."""
        prompts: list[dict[str, Any]] = [item.prompt.model_dump(by_alias=True) for item in items]
        if self.text:
            prompts.append({"kind": "text", "text": self.text})
        size = (self.handle.width, self.handle.height)
        self.prompt_round = self.used_round = parse_round({"prompts": prompts, "label": self.label}, *size)
        observability.note_round(p.kind for p in self.prompt_round.prompts)  # the latency histogram's label
        started = time.perf_counter()
        try:
            if self.prompt_round.texts or self.prompt_round.references:
                segments = self.p.semantic.segment(
                    self.ls_pid, self.labels, self.segmenter, self.handle, self.prompt_round, memory
                )
            else:
                segments = self.segmenter.segment(self.handle, self.prompt_round, memory)
        except UnsupportedPromptError:
            if not items or not self.text:
                raise  # a text-only round (or another refused kind): the engine's message is the answer
            # An engine without a label model: follow the visual prompts; the text still set the label.
            visual = [p for p in prompts if p["kind"] != "text"]
            self.used_round = parse_round({"prompts": visual, "label": self.label}, *size)
            segments = self.segmenter.segment(self.handle, self.used_round, memory)
        return segments, (time.perf_counter() - started) * 1000.0

    def remember(
        self,
        session: ObjectSession,
        items: Sequence[ContextItem],
        segments: Sequence[Segment],
        latency_ms: float,
    ) -> Segment:
        """Add the round to the session (caller holds its lock) and queue it for the history."""
        assert self.prompt_round is not None and self.used_round is not None
        best = Predictor._best(segments)
        session.session.add(self.used_round, best.mask, best.score)
        for item in items:
            if item.region_id is not None:
                session.known[item.region_id] = item
        self.p.history.submit(
            RoundRecord(
                ls_project_id=self.ls_pid,
                ls_task_id=self.task_id,
                annotator=self.annotator,
                session_key=session.session_key,
                round_index=session.rounds - 1,
                image=self.info,
                uri=self.uri,
                prompts=self.prompt_round.model_dump(mode="json", by_alias=True),
                rle=best.mask.to_coco_rle(),
                score=float(best.score),
                latency_ms=latency_ms,
                model_version=best.model_version or self.segmenter.model_version,
            )
        )
        return best

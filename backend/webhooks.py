"""``/webhook``: Label Studio events, checked here and written by the background writer.

===========================================  =======================================================
action (Label Studio 1.23 names)             what happens
===========================================  =======================================================
``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED``  the annotation's brush/polygon regions are stored as
                                             corrections beside the task's last prediction, with
                                             their IoU (upsert by annotation + region: a re-sent
                                             event changes nothing; regions removed by an update
                                             are deleted); the task's interactive sessions end
``ANNOTATIONS_CREATED``                      the same for each annotation (bulk import)
``ANNOTATIONS_DELETED`` (``ANNOTATION_DELETED``)  the annotations' corrections are deleted
``START_TRAINING``                           a training request is recorded (the training scheduler
                                             that acts on it lands in a later issue)
anything else                                acknowledged and ignored
===========================================  =======================================================

The handler only validates the payload's shape and queues a record, so it answers in milliseconds;
decoding masks and computing IoUs happen in :mod:`backend.history`'s thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backend import ls_format
from backend.errors import ApiError
from backend.history import (
    AnnotationsDeletedRecord,
    CorrectionRecord,
    HistoryWriter,
    TrainingRequestRecord,
)
from backend.projects import ProjectRegistry
from backend.sessions import SessionStore
from seemly.prompts import PromptError

CORRECTION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")
TRAINING_NOTE = (
    "training request recorded (training_requests); the training scheduler (`seemly train schedule`) "
    "starts the fine-tuning run, and its gate decides whether the new version is served"
)


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PromptError(path, "must be a non-negative integer id")
    return int(value)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PromptError(path, "must be a JSON object")
    return value


class WebhookHandler:
    def __init__(self, history: HistoryWriter, sessions: SessionStore, projects: ProjectRegistry) -> None:
        self.history = history
        self.sessions = sessions
        self.projects = projects

    def handle(self, body: Mapping[str, Any]) -> dict[str, Any]:
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise PromptError("action", "a webhook payload needs its 'action' (e.g. ANNOTATION_CREATED)")
        if action in CORRECTION_ACTIONS:
            annotation = _mapping(body.get("annotation"), "annotation")
            task = body.get("task")
            record = self._correction(
                body, annotation, task if isinstance(task, Mapping) else None, "annotation"
            )
            self._queue(record)
            self.sessions.drop_task(record.ls_project_id, record.ls_task_id)
            return {
                "status": "ok",
                "action": action,
                "queued": "corrections",
                "annotation": record.annotation_id,
            }
        if action == "ANNOTATIONS_CREATED":
            annotations = body.get("annotations")
            if not isinstance(annotations, list):
                raise PromptError("annotations", "must be a list of annotations")
            records = [
                self._correction(body, _mapping(a, f"annotations[{i}]"), None, f"annotations[{i}]")
                for i, a in enumerate(annotations)
            ]
            for record in records:
                self._queue(record)
                self.sessions.drop_task(record.ls_project_id, record.ls_task_id)
            return {"status": "ok", "action": action, "queued": "corrections", "annotations": len(records)}
        if action in DELETE_ACTIONS:
            ls_pid = self._project(body, body.get("annotation"))
            ids = self._deleted_ids(body)
            self._queue(AnnotationsDeletedRecord(ls_project_id=ls_pid, annotation_ids=ids))
            return {"status": "ok", "action": action, "queued": "delete-corrections", "annotations": len(ids)}
        if action == "START_TRAINING":
            ls_pid = self._project(body, None)
            self._queue(TrainingRequestRecord(ls_project_id=ls_pid))
            return {"status": "ok", "action": action, "training": "requested", "detail": TRAINING_NOTE}
        return {"status": "ignored", "action": action}

    # --- helpers ------------------------------------------------------------------------------------------

    def _queue(self, record: Any) -> None:
        if not self.history.submit(record):
            raise ApiError(503, "the history writer is overloaded; Label Studio may resend this event")

    @staticmethod
    def _project(body: Mapping[str, Any], annotation: Any) -> int:
        project = body.get("project")
        if project is None and isinstance(annotation, Mapping):
            project = annotation.get("project")
        if project is None:
            raise PromptError("project", "the webhook payload has no project (id)")
        return ls_format.ls_project_id(project)

    def _correction(
        self,
        body: Mapping[str, Any],
        annotation: Mapping[str, Any],
        task: Mapping[str, Any] | None,
        path: str,
    ) -> CorrectionRecord:
        ls_pid = self._project(body, annotation)
        annotation_id = _int(annotation.get("id"), f"{path}.id")
        raw_task = annotation.get("task")
        if isinstance(raw_task, Mapping):
            task = task or raw_task
            raw_task = raw_task.get("id")
        if raw_task is None and task is not None:
            raw_task = task.get("id")
        task_id = _int(raw_task, f"{path}.task")
        results = annotation.get("result")
        if results is None:
            results = []
        if not isinstance(results, list):
            raise PromptError(f"{path}.result", "must be a list of results")
        if annotation.get("was_cancelled"):
            results = []  # a skipped task corrects nothing
        project = body.get("project")
        label_config = project.get("label_config") if isinstance(project, Mapping) else None
        if label_config is not None and not isinstance(label_config, str):
            raise PromptError("project.label_config", "must be the labeling config XML as a string")
        uri = None
        if task is not None and label_config:
            config = self.projects.parse(label_config)  # LabelingConfigError -> 422 naming the tag
            data = task.get("data")
            if isinstance(data, Mapping) and isinstance(data.get(config.image.data_key), str):
                uri = data[config.image.data_key].strip() or None
        completed_by = annotation.get("completed_by")
        if isinstance(completed_by, Mapping):
            completed_by = completed_by.get("id") or completed_by.get("email")
        annotator = str(completed_by)[:255] if completed_by not in (None, "") else None
        return CorrectionRecord(
            ls_project_id=ls_pid,
            annotation_id=annotation_id,
            ls_task_id=task_id,
            annotator=annotator,
            results=list(results),
            label_config=label_config,
            uri=uri,
            action=str(body.get("action")),
        )

    @staticmethod
    def _deleted_ids(body: Mapping[str, Any]) -> list[int]:
        items = body.get("annotations")
        if items is None and body.get("annotation") is not None:
            items = [body["annotation"]]
        if not isinstance(items, list) or not items:
            raise PromptError("annotations", 'must list the deleted annotations ([{"id": 1}, ...])')
        ids = []
        for index, item in enumerate(items):
            raw = item.get("id") if isinstance(item, Mapping) else item
            ids.append(_int(raw, f"annotations[{index}].id"))
        return ids

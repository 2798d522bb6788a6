"""The one place where label-studio-ml 1.0.9 is wrapped or replaced, and why.

label-studio-ml defines the contract Label Studio speaks to an ML backend (routes, request and
response shapes). seemly keeps that contract exactly, but does not run label-studio-ml's server
(``label_studio_ml.api``) or manager (``label_studio_ml.model.LabelStudioMLManager``):

============================================  ========================================================
label-studio-ml 1.0.9 does                    seemly does instead, because
============================================  ========================================================
``api.py`` logs every request's headers and   :mod:`backend.app` never logs headers or bodies: the
body, and every response, at DEBUG            ``/setup`` body carries Label Studio's access token and
                                              the ``Authorization`` header the basic-auth password;
                                              :class:`backend.logs.RedactSecrets` masks any that
                                              still reach a log record
``exception_handler`` answers any error with  a 4xx ``{"error": "..."}`` that says what is wrong
HTTP 500 and the Python traceback in the body  (:mod:`backend.errors`); tracebacks stay in our log
``LabelStudioMLManager`` keeps the model and  per-project state in Postgres (:mod:`backend.projects`),
``/setup``'s hostname/token in class           so a restarted or second worker has it; engines and
attributes of one process (``_current_model``)  caches live in objects owned by the app
``webhook`` forks a process per event         a background writer thread (:mod:`backend.history`)
(``SimpleJobManager``) or needs Redis + rq    batches the database writes; no Redis needed
``/predict`` calls ``model.predict`` with no  sessions per (project, task, annotator)
notion of who is prompting                    (:mod:`backend.sessions`)
``/health`` calls into the manager            answers from memory only (Label Studio allows 1 s)
importing ``label_studio_ml.model`` sets      we do not import it: a backend module must not change
``torch.multiprocessing`` to ``spawn`` for    process-wide multiprocessing settings (Ray, gunicorn)
the whole process and imports torch (~2 s)
============================================  ========================================================

What is kept from label-studio-ml is its wire format, reproduced by the helpers below: the
``/predict`` answer ``{"results": [...], "model_version": ...}`` (one prediction per task, in task
order), the ``/setup`` answer ``{"model_version": ...}``, the ``/health`` answer with
``"status": "UP"``, and the ``project`` field ``"<id>.<created timestamp>"``.
"""

from __future__ import annotations

from typing import Any

from label_studio_ml import __version__ as LABEL_STUDIO_ML_VERSION  # the package root imports nothing

MODEL_CLASS = "seemly"
"""Reported in ``/health`` where label-studio-ml reports the Python class of the model."""

ROUTES = ("/", "/health", "/setup", "/predict", "/webhook", "/train", "/versions", "/metrics")
"""label-studio-ml's public routes; all of them exist in :mod:`backend.app`."""


def health_body(model_version: str) -> dict[str, Any]:
    """``GET /health``: label-studio-ml's shape (``status``, ``model_class``, ``v2``), from memory only."""
    return {
        "status": "UP",
        "model_class": MODEL_CLASS,
        "model_version": model_version,
        "v2": True,
        "label_studio_ml": LABEL_STUDIO_ML_VERSION,
    }


def setup_body(model_version: str) -> dict[str, Any]:
    """``POST /setup``: Label Studio reads ``model_version`` (it tags predictions with it)."""
    return {"model_version": model_version}


def predict_body(results: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """``POST /predict``: Label Studio requires ``results`` to hold one item per task, in order."""
    return {"results": results, "model_version": model_version}


def versions_body(model_version: str, others: list[str] | None = None) -> dict[str, Any]:
    """``GET/POST /versions``: the served version first, then the other known ones."""
    versions = [model_version, *dict.fromkeys(v for v in others or [] if v != model_version)]
    return {"versions": versions, "model_version": model_version, "model_dir": None, "v2": True}

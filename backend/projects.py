"""Per-project state: the parsed labeling config and the Label Studio connection, kept in Postgres.

``/setup`` is the only time Label Studio tells the backend its address and an access token (to
fetch ``/data/upload/...`` images). label-studio-ml keeps that in one process's memory, so a
restarted process, or a second worker, cannot fetch images until Label Studio happens to call
``/setup`` again. Here ``/setup`` also stores it in the ``projects`` row (``ls_project_id``,
``settings``), and any process that lacks it reads it back once on first need.

Where the operator configured ``SEEMLY_LABEL_STUDIO_URL`` (e.g. the Docker-network name of Label
Studio), that URL wins over the one Label Studio reports (``hostname``, often ``localhost``); the
token comes from ``SEEMLY_LABEL_STUDIO_API_KEY`` when set, else from ``/setup``.

The access token is stored in the project's settings JSON, so whoever can read the seemly database
can read it: set ``SEEMLY_LABEL_STUDIO_API_KEY`` instead where that matters (then nothing is stored).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, update
from sqlalchemy.exc import SQLAlchemyError

from backend.db import ensure_project, find_project
from plugin.labeling_config import ParsedConfig, parse_labeling_config
from seemly.config import Settings
from seemly.db.models import Project
from seemly.prompts import PromptError
from seemly.storage import Storage

log = logging.getLogger(__name__)

RETRY_LOOKUP_SECONDS = 30.0


class ProjectRegistry:
    def __init__(self, db: Engine, storage: Storage, settings: Settings, max_configs: int = 256) -> None:
        self.db = db
        self.storage = storage
        self.settings = settings
        self.max_configs = max_configs
        self._lock = threading.Lock()
        self._configs: OrderedDict[str, ParsedConfig] = OrderedDict()
        self._project_configs: dict[int, str] = {}  # ls project id -> config text seen in /setup
        self._lookup_after: dict[int, float] = {}
        self.secrets: set[str] = set()  # tokens learnt from /setup, for log redaction

    # --- labeling configs --------------------------------------------------------------------------

    def parse(self, label_config: str) -> ParsedConfig:
        """Parse (cached by content) a labeling config; ``LabelingConfigError`` names what is missing."""
        key = hashlib.sha256(label_config.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            found = self._configs.get(key)
            if found is not None:
                self._configs.move_to_end(key)
                return found
        parsed = parse_labeling_config(label_config)
        with self._lock:
            self._configs[key] = parsed
            while len(self._configs) > self.max_configs:
                self._configs.popitem(last=False)
        return parsed

    def config_for(self, ls_project_id: int, label_config: Any) -> ParsedConfig:
        """The config of a request: the one it carries, else the one ``/setup`` stored for the project."""
        if label_config is not None:
            if not isinstance(label_config, str):
                raise PromptError("label_config", "must be the labeling config XML as a string")
            return self.parse(label_config)
        with self._lock:
            text = self._project_configs.get(ls_project_id)
        if text is None:
            with self.db.connect() as conn:
                found = find_project(conn, ls_project_id)
            text = (found[1].get("label_config") if found else None) or None
        if not isinstance(text, str):
            raise PromptError(
                "label_config",
                f"the request has no labeling config and project {ls_project_id} was never set up (/setup)",
            )
        return self.parse(text)

    # --- /setup --------------------------------------------------------------------------------------

    def setup(
        self,
        ls_project_id: int,
        schema: str,
        hostname: str | None,
        access_token: str | None,
        extra_params: Any = None,
    ) -> ParsedConfig:
        """Validate the config, point storage at Label Studio, and persist both for other processes."""
        config = self.parse(schema)
        url, token = self._connection(hostname, access_token)
        if token:
            self.secrets.add(token)
        if url:
            self.storage.set_label_studio(url, token)  # validates the URL
        state: dict[str, Any] = {
            "label_config": schema,
            "setup_at": datetime.now(UTC).isoformat(),
        }
        if hostname:
            state["label_studio_url"] = hostname
        if access_token and self.settings.label_studio_api_key is None:
            state["label_studio_token"] = access_token
        if isinstance(extra_params, dict):
            state["extra_params"] = extra_params
        with self.db.begin() as conn:
            project_id = ensure_project(conn, ls_project_id)
            current = find_project(conn, ls_project_id)
            merged = {**(current[1] if current else {}), **state}
            conn.execute(
                update(Project)
                .where(Project.id == project_id)
                .values(settings=merged, labels=list(config.labels))
            )
        with self._lock:
            self._project_configs[ls_project_id] = schema
            self._lookup_after.pop(ls_project_id, None)
        return config

    def _connection(self, hostname: str | None, access_token: str | None) -> tuple[str | None, str | None]:
        env_url = self.settings.label_studio_url
        env_token = (
            self.settings.label_studio_api_key.get_secret_value()
            if self.settings.label_studio_api_key
            else None
        )
        return (env_url or hostname or None), (env_token or access_token or None)

    # --- restoring the Label Studio connection in a fresh process -------------------------------------

    def ensure_label_studio(self, ls_project_id: int) -> None:
        """If this process has no Label Studio connection yet, load the one ``/setup`` stored."""
        if self.storage.label_studio_url is not None:
            return
        now = time.monotonic()
        with self._lock:
            if self._lookup_after.get(ls_project_id, 0.0) > now:
                return
            self._lookup_after[ls_project_id] = now + RETRY_LOOKUP_SECONDS
        try:
            with self.db.connect() as conn:
                found = find_project(conn, ls_project_id)
        except SQLAlchemyError as exc:  # best effort: requests that need no Label Studio still work
            log.warning(
                "cannot read project %s's Label Studio connection: %s", ls_project_id, type(exc).__name__
            )
            return
        if not found:
            return
        stored = found[1]
        url, token = self._connection(stored.get("label_studio_url"), stored.get("label_studio_token"))
        if url and self.storage.label_studio_url is None:
            if token:
                self.secrets.add(token)
            self.storage.set_label_studio(url, token)
            text = stored.get("label_config")
            if isinstance(text, str):
                with self._lock:
                    self._project_configs.setdefault(ls_project_id, text)
            log.info("restored the Label Studio connection of project %s from the database", ls_project_id)

"""``seemly ls connect``: set up a Label Studio project for seemly, idempotently.

One call of :func:`connect_project` (the CLI is a thin wrapper around it) makes sure that:

1. a project with the given title exists (found by exact title, created if missing);
2. its labeling config is the seemly template for the given labels (``brush`` or ``polygon``);
3. the seemly ML backend is connected to it with interactive pre-annotation on (``is_interactive``);
4. a webhook sends annotation events to the backend (``<backend>/webhook`` unless told otherwise);
5. an S3 source (import) storage reads images from ``s3://bucket/prefix`` and is synced, and an S3
   target (export) storage receives annotations, both using the S3 endpoint and keys from settings.

Each step looks before it writes: running it again changes nothing and creates no duplicates. Every
step is recorded in the returned :class:`ConnectResult` (``created`` / ``updated`` / ``unchanged`` /
``skipped``), which the CLI prints. Secrets (the Label Studio token, S3 keys, the backend's
basic-auth password, credentials inside URLs) are never printed or put in the result.

Label Studio facts this relies on (checked against label-studio 1.23.2; see docs/label-studio-protocol.md):

* adding an ML backend makes Label Studio call its ``GET /health`` and ``POST /setup`` first, and
  it refuses the backend when either fails; on creation Label Studio itself also adds a webhook
  ``<backend-url>/webhook`` that sends *every* action, which step 4 narrows to the actions below;
* ``START_TRAINING`` is not a webhook action: Label Studio POSTs it to ``<backend-url>/webhook``
  itself when training is requested (``POST /api/ml/<id>/train``), whatever the webhooks say;
* creating an S3 storage makes Label Studio connect to the bucket (it must exist; an import prefix
  must hold at least one object).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

from plugin.labeling_config import LabelingConfigError, parse_labeling_config
from plugin.templates import TEMPLATE_NAMES, TemplateError, render_config
from seemly.config import Settings, get_settings

log = logging.getLogger(__name__)

WEBHOOK_ACTIONS: tuple[str, ...] = (
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
)
"""Label Studio webhook actions the backend needs (corrections). These are Label Studio's exact
names: there is no singular ``ANNOTATION_DELETED``, and ``START_TRAINING`` is sent without a webhook."""

DEFAULT_LABELS: tuple[str, ...] = ("object",)
DEFAULT_BACKEND_TITLE = "seemly"
IMAGE_REGEX = r"(?i).*\.(jpe?g|png|tiff?|bmp|webp|gif)$"
"""Objects of the S3 source that become tasks: image files only."""

Action = Literal["created", "updated", "unchanged", "skipped", "synced"]


class ConnectError(RuntimeError):
    """A step could not be done; the message says which and what Label Studio answered."""


class Step(BaseModel):
    """One thing :func:`connect_project` looked at, and what it did about it."""

    step: str
    action: Action
    detail: str = ""
    id: int | None = None

    def line(self) -> str:
        ident = f" #{self.id}" if self.id is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.step}{ident} {self.action}{detail}"


class ConnectResult(BaseModel):
    """What the project looks like after :func:`connect_project` (ids are Label Studio's)."""

    project_id: int
    project_title: str
    label_config: str
    labels: list[str]
    ml_backend_id: int | None = None
    webhook_id: int | None = None
    import_storage_id: int | None = None
    export_storage_id: int | None = None
    steps: list[Step] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        """False when the run found everything already in place."""
        return any(s.action in ("created", "updated") for s in self.steps)

    def report(self) -> str:
        """A human summary, one line per step; contains no secrets."""
        lines = [f'Label Studio project "{self.project_title}" (id {self.project_id})']
        lines += [f"  {s.line()}" for s in self.steps]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --- small helpers -----------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` without user:password (for printing)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def normalize_url(url: str) -> str:
    """Compare URLs without a trailing slash."""
    return url.strip().rstrip("/")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``; ``ValueError`` for anything else."""
    parts = urlsplit(uri.strip())
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URI: {uri!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an S3 URI has no query or fragment: {uri!r}")
    return parts.netloc, parts.path.strip("/")


def parse_labels(text: str) -> list[str]:
    """``"cat, dog"`` -> ``["cat", "dog"]`` (validated later by the template renderer)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _api_error(what: str, exc: Exception) -> ConnectError:
    body = getattr(exc, "body", None)
    status = getattr(exc, "status_code", None)
    if status is not None:
        return ConnectError(f"{what}: Label Studio answered HTTP {status}: {body}")
    return ConnectError(f"{what}: {type(exc).__name__}: {exc}")


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ConnectError:
        raise
    except Exception as exc:  # the SDK raises ApiError / httpx errors; say which step failed
        raise _api_error(what, exc) from exc


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


# --- the steps ---------------------------------------------------------------------------------


def find_project(client: Any, title: str) -> Any | None:
    """The project titled exactly ``title`` (the oldest if several, with its label config), or ``None``."""
    matches = [p for p in _call("list projects", client.projects.list, title=title) if p.title == title]
    if not matches:
        return None
    return _call("get project", client.projects.get, id=min(matches, key=lambda p: p.id).id)


def ensure_project(
    client: Any, title: str, label_config: str, steps: list[Step], existing: Any = None
) -> Any:
    """The project titled ``title`` (``existing`` if already looked up), created with ``label_config`` if missing."""
    project = existing if existing is not None else find_project(client, title)
    if project is not None:
        steps.append(Step(step="project", action="unchanged", id=project.id, detail=f'"{title}" exists'))
        return project
    project = _call(
        "create project",
        client.projects.create,
        title=title,
        label_config=label_config,
        show_collab_predictions=True,
    )
    steps.append(Step(step="project", action="created", id=project.id, detail=f'"{title}"'))
    return _call("get project", client.projects.get, id=project.id)


def ensure_label_config(client: Any, project: Any, label_config: str, steps: list[Step]) -> None:
    """Set the project's labeling config unless it already is ``label_config``."""
    current = (getattr(project, "label_config", None) or "").strip()
    if current == label_config.strip():
        steps.append(Step(step="labeling config", action="unchanged", id=None))
        return
    _call("update the labeling config", client.projects.update, id=project.id, label_config=label_config)
    steps.append(Step(step="labeling config", action="updated"))


def ensure_ml_backend(
    client: Any,
    project_id: int,
    backend_url: str,
    steps: list[Step],
    warnings: list[str],
    *,
    title: str = DEFAULT_BACKEND_TITLE,
    settings: Settings | None = None,
) -> int:
    """Connect the ML backend at ``backend_url`` with interactive pre-annotation on (one per URL)."""
    settings = settings or get_settings()
    url = normalize_url(backend_url)
    auth: dict[str, Any] = {}
    if settings.backend_basic_auth_user and settings.backend_basic_auth_password is not None:
        auth = {
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": settings.backend_basic_auth_user,
            "basic_auth_pass": _secret(settings.backend_basic_auth_password),
        }
    backends = _call("list ML backends", client.ml.list, project=project_id)
    ours = [b for b in backends if normalize_url(b.url) == url]
    for other in backends:
        if other.is_interactive and normalize_url(other.url) != url:
            warnings.append(
                f"ML backend #{other.id} ({redact_url(other.url)}) is also interactive: Label Studio sends "
                "interactive requests to the first interactive backend it lists"
            )
    if ours:
        backend = min(ours, key=lambda b: b.id)
        changes: dict[str, Any] = {}
        if not backend.is_interactive:
            changes["is_interactive"] = True
        if backend.title != title:
            changes["title"] = title
        if auth and (
            backend.auth_method != "BASIC_AUTH" or backend.basic_auth_user != auth["basic_auth_user"]
        ):
            changes.update(auth)
        if changes:
            # Label Studio re-runs /health and /setup on a PATCH and needs url and project for it.
            _call(
                "update the ML backend",
                client.ml.update,
                id=backend.id,
                url=url,
                project=project_id,
                **changes,
            )
            shown = ", ".join(sorted(k for k in changes if k != "basic_auth_pass"))
            steps.append(
                Step(
                    step="ML backend", action="updated", id=backend.id, detail=f"{redact_url(url)} ({shown})"
                )
            )
        else:
            steps.append(Step(step="ML backend", action="unchanged", id=backend.id, detail=redact_url(url)))
        return int(backend.id)
    backend = _call(
        f"connect the ML backend at {redact_url(url)} (Label Studio calls its /health and /setup)",
        client.ml.create,
        project=project_id,
        url=url,
        title=title,
        is_interactive=True,
        auto_update=True,
        **auth,
    )
    steps.append(
        Step(step="ML backend", action="created", id=backend.id, detail=f"{redact_url(url)}, interactive")
    )
    return int(backend.id)


def ensure_webhook(
    client: Any,
    project_id: int,
    webhook_url: str,
    steps: list[Step],
    actions: Sequence[str] = WEBHOOK_ACTIONS,
) -> int:
    """One webhook to ``webhook_url`` for ``actions`` (narrowing the one Label Studio adds with a backend)."""
    url = normalize_url(webhook_url)
    wanted = sorted(actions)
    hooks = [
        w
        for w in _call("list webhooks", client.webhooks.list, project=str(project_id))
        if w.project == project_id and normalize_url(w.url) == url
    ]
    if hooks:
        hook = min(hooks, key=lambda w: w.id)
        current = sorted(hook.actions or [])
        if current != wanted or hook.send_for_all_actions or not hook.send_payload or not hook.is_active:
            _call(
                "update the webhook",
                client.webhooks.update,
                id=hook.id,
                url=url,
                actions=wanted,
                send_for_all_actions=False,
                send_payload=True,
                is_active=True,
            )
            steps.append(
                Step(
                    step="webhook",
                    action="updated",
                    id=hook.id,
                    detail=f"{redact_url(url)}: {', '.join(wanted)}",
                )
            )
        else:
            steps.append(Step(step="webhook", action="unchanged", id=hook.id, detail=redact_url(url)))
        for extra in hooks[1:]:
            steps.append(
                Step(step="webhook", action="unchanged", id=extra.id, detail="duplicate left in place")
            )
        return int(hook.id)
    hook = _call(
        "create the webhook",
        client.webhooks.create,
        project=project_id,
        url=url,
        actions=wanted,
        send_for_all_actions=False,
        send_payload=True,
        is_active=True,
    )
    steps.append(
        Step(step="webhook", action="created", id=hook.id, detail=f"{redact_url(url)}: {', '.join(wanted)}")
    )
    return int(hook.id)


def _s3_common(settings: Settings) -> dict[str, Any]:
    common: dict[str, Any] = {"region_name": settings.s3_region}
    if settings.s3_endpoint_url:
        common["s3endpoint"] = settings.s3_endpoint_url
    if settings.s3_access_key_id is not None:
        common["aws_access_key_id"] = _secret(settings.s3_access_key_id)
    if settings.s3_secret_access_key is not None:
        common["aws_secret_access_key"] = _secret(settings.s3_secret_access_key)
    return common


def _same_place(storage: Any, bucket: str, prefix: str) -> bool:
    return storage.bucket == bucket and (storage.prefix or "").strip("/") == prefix


def ensure_import_storage(
    client: Any, project_id: int, uri: str, steps: list[Step], *, settings: Settings, sync: bool = True
) -> int:
    """An S3 source storage reading image objects under ``uri`` as tasks; synced when ``sync``."""
    bucket, prefix = parse_s3_uri(uri)
    api = client.import_storage.s3
    existing = [
        s
        for s in _call("list S3 source storages", api.list, project=project_id)
        if _same_place(s, bucket, prefix)
    ]
    if existing:
        storage_id = int(min(existing, key=lambda s: s.id).id)
        steps.append(Step(step="S3 source", action="unchanged", id=storage_id, detail=uri))
    else:
        storage = _call(
            f"add the S3 source {uri} (Label Studio connects to the bucket now)",
            api.create,
            project=project_id,
            bucket=bucket,
            prefix=prefix or None,
            regex_filter=IMAGE_REGEX,
            use_blob_urls=True,
            presign=True,
            presign_ttl=15,
            recursive_scan=True,
            title=f"seemly source {uri}"[:256],
            **_s3_common(settings),
        )
        storage_id = int(storage.id)
        steps.append(Step(step="S3 source", action="created", id=storage_id, detail=uri))
    if sync:
        synced = _call(f"sync the S3 source {uri}", api.sync, id=storage_id)
        status = getattr(synced, "status", None)
        count = getattr(synced, "last_sync_count", None)
        detail = f"status {status}" + (f", {count} new tasks" if count is not None else "")
        steps.append(Step(step="S3 source", action="synced", id=storage_id, detail=detail))
    return storage_id


def ensure_export_storage(
    client: Any, project_id: int, uri: str, steps: list[Step], *, settings: Settings
) -> int:
    """An S3 target storage that receives the project's annotations under ``uri``."""
    bucket, prefix = parse_s3_uri(uri)
    api = client.export_storage.s3
    existing = [
        s
        for s in _call("list S3 target storages", api.list, project=project_id)
        if _same_place(s, bucket, prefix)
    ]
    if existing:
        storage_id = int(min(existing, key=lambda s: s.id).id)
        steps.append(Step(step="S3 target", action="unchanged", id=storage_id, detail=uri))
        return storage_id
    storage = _call(
        f"add the S3 target {uri} (Label Studio connects to the bucket now)",
        api.create,
        project=project_id,
        bucket=bucket,
        prefix=prefix or None,
        can_delete_objects=False,
        title=f"seemly target {uri}"[:256],
        **_s3_common(settings),
    )
    steps.append(Step(step="S3 target", action="created", id=int(storage.id), detail=uri))
    return int(storage.id)


def connect_project(
    client: Any,
    *,
    title: str,
    template: str = "brush",
    labels: Sequence[str] | None = None,
    label_config: str | None = None,
    keep_config: bool = False,
    backend_url: str | None = None,
    backend_title: str = DEFAULT_BACKEND_TITLE,
    webhook_url: str | None = None,
    s3_source: str | None = None,
    s3_target: str | None = None,
    sync_source: bool = True,
    settings: Settings | None = None,
) -> ConnectResult:
    """Create or attach the project ``title`` and connect everything seemly needs (see module docstring).

    ``client`` is a ``label_studio_sdk.LabelStudio``. The labeling config is ``label_config`` when
    given, else ``render_config(template, labels)``; without ``labels`` an existing project keeps
    its current class names (``object`` for a new one). ``keep_config`` leaves an existing
    project's config alone (it must still be one seemly can use). ``webhook_url`` defaults to
    ``<backend_url>/webhook``; without either no webhook is set. S3 keys and endpoint come from
    ``settings`` (``SEEMLY_S3_*``).

    Raises :class:`ConnectError` (a step failed; says which), :class:`~plugin.templates.TemplateError`
    (bad labels) or :class:`~plugin.labeling_config.LabelingConfigError` (a config seemly cannot use).
    """
    settings = settings or get_settings()
    if not title.strip():
        raise ConnectError("the project title is empty")
    steps: list[Step] = []
    warnings: list[str] = []

    existing = find_project(client, title)
    existing_config = getattr(existing, "label_config", None) if existing is not None else None

    if label_config is None:
        if labels is None and existing_config:
            try:
                labels = list(parse_labeling_config(existing_config).labels) or None
            except LabelingConfigError:
                labels = None
        label_config = render_config(template, list(labels or DEFAULT_LABELS))
    if keep_config and existing_config:
        label_config = existing_config
    parsed = parse_labeling_config(label_config).require_interactive()
    warnings.extend(parsed.warnings)

    project = ensure_project(client, title, label_config, steps, existing)
    if not keep_config:
        ensure_label_config(client, project, label_config, steps)
    else:
        steps.append(Step(step="labeling config", action="skipped", detail="kept as it is (--keep-config)"))

    project_id = int(project.id)
    ids: dict[str, int | None] = {}
    if backend_url:
        ids["ml_backend_id"] = ensure_ml_backend(
            client, project_id, backend_url, steps, warnings, title=backend_title, settings=settings
        )
    else:
        steps.append(Step(step="ML backend", action="skipped", detail="no --backend-url"))

    hook_url = webhook_url or (normalize_url(backend_url) + "/webhook" if backend_url else None)
    if hook_url:
        ids["webhook_id"] = ensure_webhook(client, project_id, hook_url, steps)
    else:
        steps.append(Step(step="webhook", action="skipped", detail="no --backend-url or --webhook-url"))

    if s3_source:
        ids["import_storage_id"] = ensure_import_storage(
            client, project_id, s3_source, steps, settings=settings, sync=sync_source
        )
    if s3_target:
        ids["export_storage_id"] = ensure_export_storage(
            client, project_id, s3_target, steps, settings=settings
        )

    return ConnectResult(
        project_id=project_id,
        project_title=title,
        label_config=label_config,
        labels=list(parsed.labels),
        steps=steps,
        warnings=warnings,
        **ids,
    )


# --- command line ------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    settings = get_settings()
    parser.add_argument(
        "--url",
        default=settings.label_studio_url,
        required=settings.label_studio_url is None,
        help="Label Studio base URL (default: SEEMLY_LABEL_STUDIO_URL)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="Label Studio access token (default: SEEMLY_LABEL_STUDIO_API_KEY; prefer the variable: "
        "arguments are visible to other users of the machine)",
    )
    parser.add_argument(
        "--project", required=True, help="project title (found by exact title, created if missing)"
    )
    parser.add_argument(
        "--template", choices=TEMPLATE_NAMES, default="brush", help="labeling config template"
    )
    parser.add_argument(
        "--labels", default=None, help="comma-separated class names, e.g. cat,dog (default: keep / object)"
    )
    parser.add_argument(
        "--keep-config", action="store_true", help="leave an existing project's labeling config as it is"
    )
    parser.add_argument(
        "--backend-url", default=None, help="seemly ML backend URL, e.g. http://127.0.0.1:9090"
    )
    parser.add_argument(
        "--backend-title", default=DEFAULT_BACKEND_TITLE, help="title of the ML backend in Label Studio"
    )
    parser.add_argument("--webhook-url", default=None, help="webhook target (default: <backend-url>/webhook)")
    parser.add_argument("--s3-source", default=None, help="s3://bucket/prefix with the images to label")
    parser.add_argument("--s3-target", default=None, help="s3://bucket/prefix for exported annotations")
    parser.add_argument("--no-sync", action="store_true", help="do not sync the S3 source now")


def _valid_s3(value: str | None, flag: str) -> None:
    if value is not None:
        try:
            parse_s3_uri(value)
        except ValueError as exc:
            raise SystemExit(f"seemly ls connect: {flag}: {exc}") from None


def run(args: argparse.Namespace, words: tuple[str, ...] = ()) -> int:
    from label_studio_sdk import LabelStudio

    settings = get_settings()
    api_key = args.api_key or _secret(settings.label_studio_api_key)
    if not api_key:
        print(
            "seemly ls connect: no API key: pass --api-key or set SEEMLY_LABEL_STUDIO_API_KEY",
            file=sys.stderr,
        )
        return 2
    _valid_s3(args.s3_source, "--s3-source")
    _valid_s3(args.s3_target, "--s3-target")
    if not re.match(r"^https?://", args.url or ""):
        print(
            f"seemly ls connect: --url must be http(s)://..., not {redact_url(args.url or '')!r}",
            file=sys.stderr,
        )
        return 2
    client = LabelStudio(base_url=args.url.rstrip("/"), api_key=api_key, timeout=120)
    try:
        result = connect_project(
            client,
            title=args.project,
            template=args.template,
            labels=parse_labels(args.labels) if args.labels is not None else None,
            keep_config=args.keep_config,
            backend_url=args.backend_url,
            backend_title=args.backend_title,
            webhook_url=args.webhook_url,
            s3_source=args.s3_source,
            s3_target=args.s3_target,
            sync_source=not args.no_sync,
            settings=settings,
        )
    except (ConnectError, TemplateError, LabelingConfigError) as exc:
        print(f"seemly ls connect: {exc}", file=sys.stderr)
        return 1
    print(result.report())
    return 0

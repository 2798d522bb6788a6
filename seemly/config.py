"""One settings object for every seemly process, read from ``SEEMLY_*`` environment variables.

Every knob lives here so that the README's configuration table, the backend, the Ray workers and
the benchmarks agree. Secrets are ``SecretStr`` so that printing or logging the settings never shows
them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".seemly"


class Settings(BaseSettings):
    """Runtime configuration; each field is documented in the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="SEEMLY_", env_file=None, extra="ignore")

    # --- storage of record -------------------------------------------------------------------
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Postgres in production (postgresql+psycopg://...); "
        "unset = the embedded SQLite file $SEEMLY_HOME/seemly.db (the demo's default).",
    )
    home: Path = Field(default=DEFAULT_HOME, description="Local working directory (demo output, caches).")

    # --- object storage ------------------------------------------------------------------------
    file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that file:// URIs may read from (comma-separated). Empty = none.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint (MinIO, Ceph, moto); unset = AWS."
    )
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: SecretStr | None = Field(
        default=None, description="S3 access key id (unset = boto3 chain)."
    )
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_max_attempts: int = Field(default=4, ge=1, le=20, description="boto3 retry attempts per S3 call.")
    http_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts (besides Label Studio's) that http(s) image URLs may point at. Empty = none.",
    )

    # --- Label Studio --------------------------------------------------------------------------
    label_studio_url: str | None = Field(
        default=None, description="Label Studio base URL (also set by /setup)."
    )
    label_studio_api_key: SecretStr | None = Field(default=None, description="Label Studio access token.")

    # --- images --------------------------------------------------------------------------------
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="Decompression-bomb guard.")
    max_image_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Largest image file accepted.")

    # --- engines -------------------------------------------------------------------------------
    engine: str = Field(default="classic", description="Engine name: classic | sam | sam2.")
    engine_checkpoint: str | None = Field(
        default=None, description="Checkpoint path or URI for weight-based engines."
    )
    device: str = Field(
        default="auto", description="torch device for weight-based engines: auto | cpu | cuda."
    )
    clip_checkpoint: str | None = Field(
        default=None,
        description="open_clip weights (path, file:// or s3:// URI) for open-vocabulary text prompts in "
        "the backend; None = text prompts use the project's label model",
    )
    clip_model: str = Field(
        default="ViT-B-32", description="open_clip architecture of SEEMLY_CLIP_CHECKPOINT."
    )
    clip_config: str | None = Field(
        default=None,
        description="open_clip model config JSON for SEEMLY_CLIP_CHECKPOINT (instead of clip_model).",
    )

    # --- Ray -----------------------------------------------------------------------------------
    ray_address: str | None = Field(default=None, description="Ray cluster address; unset = local Ray.")
    ray_num_cpus_per_actor: float = Field(default=0.5, gt=0, description="CPUs per Ray Data / Serve actor.")
    ray_num_gpus_per_actor: float = Field(default=0.0, ge=0, description="GPUs per actor (0 = CPU only).")

    # --- Serve segmenter -----------------------------------------------------------------------
    segmenter_url: str | None = Field(
        default=None,
        description="Where the backend's segmenter runs: unset = in this process; "
        "http://host:8000/segment = the Ray Serve segmenter (`seemly serve`) over HTTP; "
        "serve://segmenter = the same through a DeploymentHandle (a process on the Ray cluster).",
    )
    segmenter_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait for one answer of the Serve segmenter (first rounds embed).",
    )

    # --- backend -------------------------------------------------------------------------------
    backend_basic_auth_user: str | None = Field(
        default=None, description="Basic-auth user for the ML backend."
    )
    backend_basic_auth_password: SecretStr | None = Field(default=None, description="Basic-auth password.")
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1, description="Largest HTTP request body.")

    # --- observability -------------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log line format of every seemly process: text | json."
    )
    metrics_public: bool = Field(
        default=False,
        description="Serve the backend's /metrics and /health/deep without basic auth (they hold no secrets).",
    )
    metrics_db_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="Longest wait of a /metrics scrape for the database."
    )
    metrics_db_cache_s: float = Field(
        default=5.0, ge=0, description="How long /metrics reuses the database figures it read."
    )
    health_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="Per-component deadline of the backend's /health/deep."
    )
    health_s3_uris: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="s3://bucket/prefix locations /health/deep lists one key from (comma-separated).",
    )
    version_refresh_s: float = Field(
        default=5.0,
        ge=0,
        description="How long the backend uses a project's promoted model version before reading the "
        "registry again (a promotion or rollback reaches every backend process within this).",
    )

    # --- learning loop (seemly train; per-project overrides in projects.settings["training"]) ----
    artifacts_uri: str = Field(
        default="",
        description="Where training writes model artifacts and Ray Train checkpoints: file:///dir or "
        "s3://bucket/prefix; unset = file://$SEEMLY_HOME/artifacts.",
    )
    train_min_new_corrections: int = Field(
        default=50, ge=1, description="Start a training after this many new corrections (scheduler)."
    )
    train_interval_s: float = Field(
        default=86400.0, gt=0, description="Start a training this long after the last one if new data came."
    )
    train_gate_noc_margin: float = Field(
        default=0.05,
        ge=-1,
        le=1,
        description="Promote only if held-out NoC@90 falls by at least this share of the current one.",
    )
    train_gate_miou_tolerance: float = Field(
        default=0.01, ge=0, le=1, description="Promote only if held-out mIoU falls by at most this."
    )
    train_gate_min_images: int = Field(
        default=3, ge=1, description="Promote only when the gate measured at least this many held-out images."
    )
    train_held_out_share: float = Field(
        default=0.2, gt=0, lt=1, description="Share of a project's images held out for the gate."
    )
    train_max_images: int = Field(default=500, ge=2, description="Learn from at most the newest N images.")
    train_epochs: int = Field(default=6, ge=1, le=1000, description="Epochs of one fine-tuning round.")
    train_num_workers: int = Field(default=1, ge=1, description="Ray Train workers of one training.")
    train_stale_after_s: float = Field(
        default=600.0,
        gt=0,
        description="A running training whose heartbeat is older than this is dead and is taken over.",
    )

    @model_validator(mode="after")
    def _default_database_in_home(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home.expanduser() / 'seemly.db'}"
        return self

    @field_validator("file_roots", "http_allowed_hosts", "health_s3_uris", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("health_s3_uris")
    @classmethod
    def _s3_only(cls, value: list[str]) -> list[str]:
        for uri in value:
            if not uri.startswith("s3://") or len(uri) <= len("s3://"):
                raise ValueError(f"{uri!r} is not an s3://bucket/prefix location")
        return value

    @field_validator("file_roots")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in value]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached: read the environment once)."""
    return Settings()

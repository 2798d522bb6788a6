"""One settings object for every seemly process, read from ``SEEMLY_*`` environment variables.

Every knob lives here so that the README's configuration table, the backend, the Ray workers and
the benchmarks agree. Secrets are ``SecretStr`` so that printing or logging the settings never shows
them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

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

    @model_validator(mode="after")
    def _default_database_in_home(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home.expanduser() / 'seemly.db'}"
        return self

    @field_validator("file_roots", "http_allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("file_roots")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in value]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached: read the environment once)."""
    return Settings()

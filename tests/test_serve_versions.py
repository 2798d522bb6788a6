"""The Serve segmenter loads a version registered in Postgres by name: promotion needs no redeploy.

One small deployment (one replica, a quarter CPU) on the shared ``ray_local``; its replica reads the
registry through ``SEEMLY_DATABASE_URL`` (given to it as a ``runtime_env`` variable, as a RayService
would). A version that is in neither the live config nor the registry is still a clear error.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from backend.serve_client import ServeSegmenter
from seemly.db.registry import ensure_project
from seemly.engines.base import EngineError
from seemly.learning import versions
from tests.test_serve import picture


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def service_url(ray_local: str, postgres_url: str) -> Iterator[str]:
    from ray import serve

    from workers import serve_cli

    port = _free_port()
    config = serve_cli.apply_overrides(
        serve_cli.base_config(host="127.0.0.1", port=port),
        replicas=1,
        num_cpus=0.25,
        live={"engine": "classic"},
    )
    entry = config["applications"][0]["deployments"][0]
    entry["ray_actor_options"]["runtime_env"] = {"env_vars": {"SEEMLY_DATABASE_URL": postgres_url}}
    serve_cli.deploy(config, wait_s=180)
    try:
        yield f"http://127.0.0.1:{port}/segment"
    finally:
        serve.delete("segmenter")
        serve.shutdown()


def test_a_registered_version_is_served_by_name(service_url: str, postgres_db: Engine) -> None:
    project_id = ensure_project(postgres_db, "serve-versions")
    info = versions.register_candidate(postgres_db, project_id, "classic", parent_id=None, artifact_uri=None)
    client = ServeSegmenter(service_url, timeout_s=60)
    try:
        pic = picture(7)
        segments = client.for_version(info).segment(pic.handle(), pic.click())
        assert segments[0].model_version == info.name
        assert pic.iou(segments[0].mask.data) > 0.8
        assert client.last_answer["model_version"] == info.name
        # the service's default is untouched
        assert client.segment(pic.handle(), pic.click())[0].model_version == "classic-1"
        with pytest.raises(EngineError, match="unknown model version 'p999-classic-ft1'"):
            client.for_version("p999-classic-ft1").segment(pic.handle(), pic.click())
    finally:
        client.close()

"""The model-version registry on real Postgres: candidates, promotion, rollback, loading specs."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, func, select

from seemly.db.models import ModelVersion
from seemly.db.registry import ensure_project
from seemly.learning import versions


def test_candidates_are_named_per_project_and_not_promoted(postgres_db: Engine) -> None:
    a = ensure_project(postgres_db, "alpha")
    b = ensure_project(postgres_db, "beta")
    first = versions.register_candidate(
        postgres_db, a, "classic", parent_id=None, artifact_uri="file:///x/1.pt"
    )
    second = versions.register_candidate(postgres_db, a, "classic", parent_id=first.id, artifact_uri=None)
    other = versions.register_candidate(postgres_db, b, "classic", parent_id=None, artifact_uri=None)
    assert (first.name, second.name, other.name) == (
        f"p{a}-classic-ft1",
        f"p{a}-classic-ft2",
        f"p{b}-classic-ft1",
    )
    assert not first.promoted and second.parent_id == first.id
    assert versions.promoted_version(postgres_db, a) is None  # the base engine serves
    assert versions.get_by_name(postgres_db, second.name) == second
    assert versions.get_by_name(postgres_db, "nope") is None
    assert [v.name for v in versions.list_versions(postgres_db, a)] == [first.name, second.name]


def test_promote_moves_the_single_flag_and_rollback_returns_to_the_parent(postgres_db: Engine) -> None:
    project = ensure_project(postgres_db, "alpha")
    first = versions.register_candidate(postgres_db, project, "classic", parent_id=None, artifact_uri=None)
    versions.promote(postgres_db, first.id)
    second = versions.register_candidate(
        postgres_db, project, "classic", parent_id=first.id, artifact_uri="file:///r.pt"
    )
    versions.record_decision(postgres_db, second.id, {"promote": True, "reason": "better"}, {"noc90": 2.0})
    versions.promote(postgres_db, second.id)

    served = versions.promoted_version(postgres_db, project)
    assert served is not None and served.name == second.name
    assert served.decision == {"promote": True, "reason": "better"} and served.metrics == {"noc90": 2.0}
    with postgres_db.connect() as conn:
        promoted = conn.execute(
            select(func.count()).where(ModelVersion.project_id == project, ModelVersion.promoted.is_(True))
        ).scalar_one()
    assert promoted == 1

    back = versions.rollback(postgres_db, project)
    assert back is not None and back.name == first.name
    assert versions.promoted_version(postgres_db, project) == back
    assert versions.rollback(postgres_db, project) is None  # first had no parent: the base engine
    assert versions.promoted_version(postgres_db, project) is None
    with pytest.raises(versions.VersionError, match="nothing to roll back"):
        versions.rollback(postgres_db, project)


def test_concurrent_registrations_get_distinct_names(postgres_db: Engine) -> None:
    project = ensure_project(postgres_db, "alpha")
    names: list[str] = []
    errors: list[BaseException] = []

    def register() -> None:
        for _ in range(3):
            try:
                names.append(
                    versions.register_candidate(
                        postgres_db, project, "classic", parent_id=None, artifact_uri=None
                    ).name
                )
            except BaseException as exc:  # an IntegrityError would be a lost candidate
                errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(names) == len(set(names)) == 9


def test_engine_spec_maps_artifacts_to_engine_options() -> None:
    def info(engine: str, uri: str | None) -> versions.VersionInfo:
        return versions.VersionInfo(1, "v", engine, 1, None, uri, False, {}, None)

    assert versions.engine_spec(info("classic", None)) == ("classic", {})
    assert versions.engine_spec(info("classic", "s3://b/r.pt")) == ("classic", {"refiner_uri": "s3://b/r.pt"})
    assert versions.engine_spec(info("sam", "file:///m.pth")) == ("sam", {"checkpoint": "file:///m.pth"})


def test_promoting_a_missing_version_is_a_clear_error(postgres_db: Engine) -> None:
    with pytest.raises(versions.VersionError, match="no model version with id 999"):
        versions.promote(postgres_db, 999)

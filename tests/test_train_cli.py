"""``seemly train versions | promote | rollback`` and the CLI's errors, on real Postgres (no Ray)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from seemly.cli import main
from seemly.config import get_settings
from seemly.learning import versions
from tests.train_support import make_project


@pytest.fixture
def cli_db(postgres_db, postgres_url, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[object]:
    monkeypatch.setenv("SEEMLY_DATABASE_URL", postgres_url)
    monkeypatch.setenv("SEEMLY_HOME", str(tmp_path))
    get_settings.cache_clear()
    yield postgres_db
    get_settings.cache_clear()


def _lineage(db, project_id: int) -> tuple[versions.VersionInfo, versions.VersionInfo]:
    """ft1 promoted by its gate, then ft2 (child of ft1) promoted too."""
    ft1 = versions.register_candidate(
        db,
        project_id,
        "classic",
        parent_id=None,
        artifact_uri="file:///a/1",
        metrics={"noc90": 4.0, "miou": 0.8},
    )
    versions.record_decision(db, ft1.id, {"promote": True, "reason": "promote: NoC@90 5.00 -> 4.00"})
    versions.promote(db, ft1.id)
    ft2 = versions.register_candidate(
        db,
        project_id,
        "classic",
        parent_id=ft1.id,
        artifact_uri="file:///a/2",
        metrics={"noc90": 3.5, "miou": 0.82},
    )
    versions.record_decision(db, ft2.id, {"promote": True, "reason": "promote: NoC@90 4.00 -> 3.50"})
    versions.promote(db, ft2.id)
    return ft1, ft2


def test_versions_rollback_and_promote(cli_db, capsys: pytest.CaptureFixture[str]) -> None:
    project_id = make_project(cli_db, "cats", 7)
    ft1, ft2 = _lineage(cli_db, project_id)

    assert main(["train", "versions", "--project", "cats"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "parent", "NoC@90", "mIoU", "decision", "promoted"]
    assert table[1].split()[:4] == [ft1.name, "—", "4.00", "0.800"] and not table[1].endswith("yes")
    assert table[2].split()[:4] == [ft2.name, ft1.name, "3.50", "0.820"] and table[2].endswith("yes")

    assert main(["train", "rollback", "--project", "7"]) == 0  # by Label Studio project id
    assert capsys.readouterr().out.strip() == f"project cats now serves {ft1.name}"
    assert versions.promoted_version(cli_db, project_id).id == ft1.id
    assert main(["train", "rollback", "--project", "cats"]) == 0
    assert capsys.readouterr().out.strip() == "project cats now serves the base classic engine"
    assert versions.promoted_version(cli_db, project_id) is None
    assert main(["train", "rollback", "--project", "cats"]) == 2
    assert "serves the base engine: there is nothing to roll back" in capsys.readouterr().err

    assert main(["train", "promote", "--project", "cats", "--version", ft2.name]) == 0
    assert versions.promoted_version(cli_db, project_id).id == ft2.id
    capsys.readouterr()


def test_clear_errors_for_bad_projects_and_versions(cli_db, capsys: pytest.CaptureFixture[str]) -> None:
    cats = make_project(cli_db, "cats", 7)
    dogs = make_project(cli_db, "dogs", 8)
    _, dog_version = _lineage(cli_db, dogs)
    del cats

    assert main(["train", "versions", "--project", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: no project named 'nope' or with Label Studio project id 'nope'; known projects: cats, dogs"
    )
    assert main(["train", "versions", "--project", "cats"]) == 0
    assert capsys.readouterr().out.strip() == "project cats has no versions yet"
    # another project's version cannot be promoted here
    assert main(["train", "promote", "--project", "cats", "--version", dog_version.name]) == 2
    assert f"project cats has no version named '{dog_version.name}'" in capsys.readouterr().err
    assert main(["train", "run", "--project", "nope"]) == 2
    assert "no project named 'nope'" in capsys.readouterr().err
    assert main(["train", "schedule", "--once", "--interval-s", "0"]) == 2
    assert "--interval-s must be positive" in capsys.readouterr().err


def test_schedule_once_with_nothing_due(cli_db, capsys: pytest.CaptureFixture[str]) -> None:
    make_project(cli_db, "cats", 7, training={"min_new_corrections": "many"})
    assert main(["train", "schedule", "--once"]) == 0
    out = capsys.readouterr().out
    assert 'cats: invalid — project cats: settings["training"] is invalid: min_new_corrections' in out

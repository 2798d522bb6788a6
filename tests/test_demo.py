"""The README's main job, `seemly demo`, end to end on real Postgres."""

from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from seemly.cli import main
from seemly.config import get_settings
from seemly.db.models import Image, Job, JobItem, Mask, MaskSource


@pytest.fixture()
def demo_env(monkeypatch: pytest.MonkeyPatch, postgres_db: Engine, postgres_url: str, tmp_path: Path) -> Path:
    monkeypatch.setenv("SEEMLY_DATABASE_URL", postgres_url)
    monkeypatch.setenv("SEEMLY_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "out"
    get_settings.cache_clear()


def test_demo_segments_samples_stores_masks_and_reports_the_broken_file(
    demo_env: Path, postgres_db: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(demo_env)]) == 0
    printed = capsys.readouterr().out
    assert "broken.jpg" in printed and "failed" in printed

    overlays = {p.stem for p in (demo_env / "overlays").glob("*.png")}

    with postgres_db.connect() as conn:
        job = conn.execute(select(Job)).one()
        # Every object is accounted for: done with a non-empty mask, or failed with a reason.
        assert job.items_total == 7 and job.items_done + job.items_failed == 7
        assert job.items_done >= 5, "the engine should find the object in most sample photos"
        assert f"done {job.items_done}, failed {job.items_failed}" in printed
        masks = conn.execute(select(Mask.source, Mask.area, Mask.score)).all()
        assert len(masks) == job.items_done == job.masks_written
        assert all(m.source == MaskSource.BUCKET and m.area > 0 and 0 <= m.score <= 1 for m in masks)
        failed = dict(
            conn.execute(select(JobItem.item_key, JobItem.error).where(JobItem.status == "failed")).all()
        )
        broken = next(key for key in failed if key.endswith("broken.jpg"))
        assert "truncated" in failed[broken] or "corrupt" in failed[broken]
        assert all(failed.values()), "every failed item carries its reason"
        assert conn.execute(select(func.count()).select_from(Image)).scalar_one() == job.items_done
        done = conn.execute(select(JobItem.item_key).where(JobItem.status == "done")).scalars().all()
        assert overlays == {Path(key).stem for key in done}, "one overlay PNG per segmented image"
        first_masks = len(masks)

    # A second run is a new job over the same images: the masks' unique key keeps them single.
    assert main(["demo", "--out", str(demo_env)]) == 0
    with postgres_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Mask)).scalar_one() == first_masks

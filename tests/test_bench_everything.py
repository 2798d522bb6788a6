"""The segment-everything benchmark, the hierarchical proposer, and the reference benchmark's plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from seemly.bench import everything as bench
from seemly.bench.datasets import Dataset
from seemly.cli import main
from seemly.engines.everything import Params, propose
from tests.semantic_scenes import iou, make_scene


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for seed in range(2):
        scene = make_scene(seed, ["apple", "box"])
        cv2.imwrite(str(root / "images" / f"s{seed}.png"), scene.image[:, :, ::-1])
        cv2.imwrite(str(root / "masks" / f"s{seed}.png"), scene.union("apple").astype(np.uint8) * 255)
    return root


def test_propose_is_non_overlapping_and_finds_the_objects() -> None:
    scene = make_scene(3, ["apple", "box", "leaf"])
    proposals = propose(scene.image)
    masks = np.stack([m for m, _ in proposals])
    assert masks.sum(axis=0).max() <= 1  # non-overlapping
    scores = [s for _, s in proposals]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for _, truth in scene.objects:
        assert max(iou(m, truth) for m, _ in proposals) > 0.9


def test_propose_tiny_and_grey_images() -> None:
    assert len(propose(np.zeros((4, 5, 3), np.uint8))) == 1
    flat = propose(np.full((60, 80), 128, np.uint8))
    assert len(flat) >= 1 and flat[0][0].shape == (60, 80)
    assert propose(make_scene(4, ["apple"]).image, params=Params(border_penalty=0.0))


def test_benchmark_summary(dataset: Path) -> None:
    proposers = {name: bench.make_proposer(name) for name in ("classic", "everything")}
    summaries, rows = bench.run_benchmark(Dataset(dataset), proposers)
    assert [s.proposer for s in summaries] == ["classic", "everything"] and len(rows) == 4
    for summary in summaries:
        assert summary.images == 2 and summary.mean_best_iou > 0.9 and summary.share_best_iou_08 == 1.0
        assert summary.proposals_per_image >= 1 and summary.seconds_per_image > 0
    assert "| everything | 2 |" in bench.markdown_table(summaries)


def test_cli(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    code = main(
        [
            "bench",
            "everything",
            "--dataset",
            str(dataset),
            "--proposer",
            "everything",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["summaries"][0]["proposer"] == "everything" and len(payload["results"]) == 2
    assert "best IoU" in md.read_text() and "best IoU" in capsys.readouterr().out


def test_reference_benchmark_cli(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ref.json"
    code = main(
        [
            "bench",
            "reference",
            "--dataset",
            str(dataset),
            "--limit",
            "1",
            "--synthetic",
            "1",
            "--modes",
            "full",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    summary = {row["kind"]: row for row in json.loads(out.read_text())["summary"]}
    assert set(summary) == {
        "grabcut-flip",
        "grabcut-scale",
        "grabcut-jitter",
        "grabcut-all",
        "synthetic-textured",
        "synthetic-flat",
    }
    assert summary["grabcut-jitter"]["mean_iou"] > 0.9 and summary["synthetic-flat"]["mean_iou"] > 0.8

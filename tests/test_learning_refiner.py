"""The learned refiner of the classic engine: files, loading by URI, fitting, evaluation, uncertainty.

The synthetic task: bright discs on a dark, noisy background whose ground truth is the disc
*plus a 4-pixel halo* (an annotation convention the graph cut cannot know), so the classic engine
is systematically too tight and a refiner has something real to learn.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from seemly.bench import metrics
from seemly.bench.datasets import Sample
from seemly.bench.interactive import run_benchmark
from seemly.engines.classic import ClassicEngine
from seemly.engines.classic_prompts import rasterize
from seemly.learning.evaluate import evaluate_engine
from seemly.learning.examples import simulate_examples
from seemly.learning.fit import FitConfig, evaluate_loss, fit_refiner
from seemly.learning.refiner import LearnedRefiner, RefinerConfig, RefinerError
from seemly.learning.uncertainty import image_uncertainty
from seemly.masks import Mask
from seemly.prompts import Click, PromptRound
from seemly.storage import Storage, path_to_uri

SMALL = RefinerConfig(size=32, channels=(8, 12, 16))
HALO = 4


def disc_sample(seed: int, size: int = 72) -> Sample:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.14, 0.22) * size
    distance = np.hypot(yy - cy, xx - cx)
    disc = distance <= radius
    image = rng.normal(40, 8, (size, size, 3))
    image[disc] = rng.normal(210, 8, (int(disc.sum()), 3))
    gt = distance <= radius + HALO
    image = np.clip(image, 0, 255).astype(np.uint8)
    return Sample(stem=f"disc{seed}", image=image, gt=gt, ignore=None, image_path=Path(f"disc{seed}.png"))


def _examples(seeds: range) -> list:
    engine = ClassicEngine()
    examples = []
    for seed in seeds:
        sample = disc_sample(seed)
        examples += simulate_examples(
            engine,
            sample.image,
            sample.gt,
            rng=np.random.default_rng(seed),
            max_clicks=3,
            sessions=1,
            config=SMALL,
            source=sample.stem,
        )
    return examples


@pytest.fixture(scope="module")
def examples() -> list:
    return _examples(range(8))


@pytest.fixture(scope="module")
def trained(examples: list) -> LearnedRefiner:
    return fit_refiner(examples, FitConfig(epochs=12, batch=8, lr=5e-3, seed=1, refiner=SMALL, threads=1))


def test_simulated_examples_capture_the_refiner_inputs(examples: list) -> None:
    assert len(examples) >= 8
    first = examples[0]
    assert first.planes.shape == (8, SMALL.size, SMALL.size) and first.planes.dtype == np.uint8
    assert first.target.shape == (SMALL.size, SMALL.size)
    assert first.round_index == 0 and first.source == "disc0"
    # the classic mask (plane 4) is systematically smaller than the target: the halo
    assert (first.planes[4] > 127).sum() < (first.target > 127).sum()


def test_simulate_examples_rejects_bad_input() -> None:
    sample = disc_sample(0)
    engine = ClassicEngine()
    with pytest.raises(ValueError, match="empty"):
        simulate_examples(engine, sample.image, np.zeros_like(sample.gt), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="ground truth is"):
        simulate_examples(engine, sample.image, sample.gt[:10], rng=np.random.default_rng(0))


def test_untrained_refiner_returns_the_classic_mask() -> None:
    sample = disc_sample(3)
    maps = rasterize(PromptRound(prompts=[Click(x=36, y=36)]), (), 72, 72)
    mask = sample.gt.copy()
    out = LearnedRefiner.untrained(SMALL)(sample.image, maps, mask, mask.astype(np.float32))
    assert out.dtype == np.float32 and out.shape == mask.shape
    assert np.array_equal(out >= 0.5, mask)


def test_fit_is_deterministic_and_lowers_the_loss(examples: list, trained: LearnedRefiner) -> None:
    config = FitConfig(epochs=1, batch=8, seed=3, refiner=SMALL, threads=1, max_steps=3)
    reports: list[dict] = []
    a = fit_refiner(examples, config, report=lambda m, model: reports.append(m))
    b = fit_refiner(examples, config)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert reports and reports[0]["epoch"] == 1 and reports[0]["steps"] == 3
    untrained = evaluate_loss(LearnedRefiner.untrained(SMALL), examples)
    assert evaluate_loss(trained, examples) < 0.8 * untrained
    # fine-tuning starts from init's weights and keeps its architecture
    tuned = fit_refiner(examples, config, init=trained)
    assert tuned.config == SMALL and tuned.meta["steps"] == trained.meta["steps"] + 3


def test_fit_rejects_examples_of_another_size(examples: list) -> None:
    with pytest.raises(ValueError, match="another size"):
        fit_refiner(examples, FitConfig(epochs=1, refiner=RefinerConfig(size=64, channels=(8, 8))))
    with pytest.raises(ValueError, match="no training examples"):
        fit_refiner([], FitConfig())


def _roundtrip(refiner: LearnedRefiner, uri: str, storage: Storage) -> LearnedRefiner:
    refiner.save(uri, storage)
    loaded = LearnedRefiner.load(uri, storage)
    assert loaded.config == refiner.config
    for key, value in refiner.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    return loaded


def test_save_load_file_roundtrip(tmp_path: Path, trained: LearnedRefiner) -> None:
    storage = Storage(file_roots=[tmp_path])
    loaded = _roundtrip(trained, path_to_uri(tmp_path / "r" / "refiner.pt"), storage)
    assert loaded.meta["seed"] == 1


def test_save_load_s3_roundtrip(s3_bucket, trained: LearnedRefiner) -> None:
    _roundtrip(trained, s3_bucket.uri("p1/train-1/refiner.pt"), s3_bucket.storage)


def test_bad_files_give_clear_errors(tmp_path: Path, trained: LearnedRefiner) -> None:
    good = trained.to_bytes()
    with pytest.raises(RefinerError, match="empty file"):
        LearnedRefiner.from_bytes(b"")
    with pytest.raises(RefinerError, match="not a readable refiner file"):
        LearnedRefiner.from_bytes(b"garbage" * 100)
    with pytest.raises(RefinerError, match="not a readable refiner file"):
        LearnedRefiner.from_bytes(good[: len(good) // 2])
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(3)}, buffer)
    with pytest.raises(RefinerError, match="not a seemly classic refiner"):
        LearnedRefiner.from_bytes(buffer.getvalue())
    # weights of another architecture than the config declares
    payload = torch.load(io.BytesIO(good), weights_only=True)
    payload["config"] = RefinerConfig(size=32, channels=(8, 12)).model_dump_json()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with pytest.raises(RefinerError, match=r"do not fit the declared architecture: .*unexpected keys"):
        LearnedRefiner.from_bytes(buffer.getvalue())
    payload["config"] = '{"size": 30, "channels": [8, 12, 16]}'
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with pytest.raises(RefinerError, match=r"invalid refiner config.*divisible"):
        LearnedRefiner.from_bytes(buffer.getvalue())
    storage = Storage(file_roots=[tmp_path])
    with pytest.raises(RefinerError, match="cannot read refiner"):
        LearnedRefiner.load(path_to_uri(tmp_path / "missing.pt"), storage)


def test_classic_engine_loads_refiner_uri(tmp_path: Path, trained: LearnedRefiner) -> None:
    storage = Storage(file_roots=[tmp_path])
    uri = trained.save(path_to_uri(tmp_path / "refiner.pt"), storage)
    plain = ClassicEngine()
    refined = ClassicEngine(refiner_uri=uri, storage=storage)
    assert isinstance(refined.refiner, LearnedRefiner)
    assert refined.model_version == plain.model_version == "classic-1"
    better = 0
    for seed in (20, 21, 22):  # images the refiner never saw
        sample = disc_sample(seed)
        gt = Mask(sample.gt.copy())
        cy, cx = np.argwhere(sample.gt).mean(axis=0)
        prompt = PromptRound(prompts=[Click(x=float(cx) + 0.5, y=float(cy) + 0.5)])
        a = plain.segment(plain.embed(sample.image, "a"), prompt)[0].mask
        b = refined.segment(refined.embed(sample.image, "a"), prompt)[0].mask
        assert a.shape == b.shape and b.data.dtype == a.data.dtype == bool
        assert a != b
        better += gt.iou(b) > gt.iou(a)
    assert better >= 2
    with pytest.raises(RefinerError, match="cannot read refiner"):
        ClassicEngine(refiner_uri=path_to_uri(tmp_path / "nope.pt"), storage=storage)


def test_evaluate_engine_matches_the_benchmark() -> None:
    sample = disc_sample(5)
    engine = ClassicEngine()
    result = evaluate_engine(engine, [sample], max_clicks=6)
    summaries, rows = run_benchmark(
        type("D", (), {"__iter__": lambda self: iter([sample]), "__len__": lambda self: 1})(),
        {"classic": engine},
        max_clicks=6,
        box=False,
        scribble=False,
        progress=False,
    )
    assert result.noc90 == summaries[0].noc90
    assert result.miou == summaries[0].miou
    assert result.failures == summaries[0].failures90
    assert result.rows[0].ious == rows[0].ious
    assert result.per_image_noc90() == {"disc5": metrics.noc(rows[0].ious, 0.9, 6)}
    with pytest.raises(ValueError, match="no samples"):
        evaluate_engine(engine, [])


def test_uncertainty_is_higher_for_an_ambiguous_image() -> None:
    clear = disc_sample(7, size=96)
    rng = np.random.default_rng(0)
    # ambiguous: a texture of blobs of two colours, no single object
    blobs = rng.uniform(0, 1, (12, 12)) > 0.5
    noise = np.kron(blobs, np.ones((8, 8))).astype(bool)
    ambiguous = np.where(noise[..., None], 160, 90) + rng.normal(0, 25, (96, 96, 3))
    ambiguous = np.clip(ambiguous, 0, 255).astype(np.uint8)
    engine = ClassicEngine()
    u_clear = image_uncertainty([engine], clear.image, "clear")
    u_ambiguous = image_uncertainty([engine], ambiguous, "ambiguous")
    assert 0.0 <= u_clear.score <= 1.0 and 0.0 <= u_ambiguous.score <= 1.0
    assert set(u_clear.components) == {"score", "instability", "ambiguity"}
    assert u_ambiguous.score > u_clear.score
    # two versions: disagreement joins the components
    both = image_uncertainty([engine, engine], clear.image, "clear")
    assert both.components["disagreement"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one engine"):
        image_uncertainty([], clear.image, "x")


def test_learning_curve_split_and_plot(tmp_path: Path) -> None:
    from tests.fixtures.benchmarks import load_benchmark

    module = load_benchmark("learning_curve")
    stems = [f"img{i}" for i in range(10)]
    pool, test = module.split(stems, 6)
    assert (pool, test) == module.split(list(reversed(stems)), 6)
    assert len(pool) == 6 and not set(pool) & set(test) and set(pool) | set(test) == set(stems)
    points = [{"labelled": n, "noc90": 3.0 - 0.1 * n, "miou_mean": 0.9} for n in (0, 2, 4)]
    payload = {
        "baseline": {"noc90": 3.0},
        "curves": [{"label": "random", "points": points}, {"label": "active", "points": points}]
        + [
            {"label": label, "points": points}
            for label in ("weighted seed 0", "weighted seed 1", "weighted-mean")
        ],
    }
    assert module.ORDERS == ("random", "active", "weighted", "hybrid", "diverse", "auto")
    module.plot(payload, tmp_path / "curve.png")
    from PIL import Image

    assert Image.open(tmp_path / "curve.png").size == (760, 440)

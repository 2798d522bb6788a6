"""Does the untrained engine's uncertainty predict how many clicks an image needs? (issue #8)

    .venv/bin/python benchmarks/uncertainty_vs_noc.py --start 90 --count 60 --json /tmp/u.json

For ``--count`` images of the synthetic one-class project (``seemly.bench.domain``; seeds from
``--start``: 90 and up are never used by ``learning_curve.py --dataset domain``, so they are a fresh
check), the untrained classic engine's per-image NoC@90 (the benchmark's simulated annotator) next
to :func:`~seemly.learning.uncertainty.image_uncertainty` with the centre probes alone (the measure
before object probes, old weights) and with clicks on guessed objects (today's default), each with
two probe seeds, and the Spearman rank correlation of every measure and component with NoC@90 and
between the two probe seeds (how much of a ranking is the probes' jitter). No training: minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seemly.bench.domain import domain_samples  # noqa: E402
from seemly.bench.interactive import machine_description  # noqa: E402
from seemly.engines.classic import ClassicEngine  # noqa: E402
from seemly.learning.evaluate import evaluate_engine  # noqa: E402
from seemly.learning.uncertainty import image_uncertainty  # noqa: E402

OLD_WEIGHTS = {"score": 0.3, "instability": 0.5}  # the centre-probe measure as it was


def measure(start: int, count: int, probes: int = 2) -> dict:
    samples = domain_samples(count, start=start)
    engine = ClassicEngine()
    noc = evaluate_engine(engine, samples, max_clicks=20).per_image_noc90()
    rows = []
    for sample in samples:
        sha = hashlib.sha256(sample.image.tobytes()).hexdigest()
        row: dict = {"stem": sample.stem, "noc90": noc[sample.stem]}
        for seed in (0, 1):
            old = image_uncertainty([engine], sample.image, sha, seed=seed, probes=probes, proposals=None)
            started = time.perf_counter()
            new = image_uncertainty([engine], sample.image, sha, seed=seed, probes=probes)
            row[f"new_seconds_{seed}"] = time.perf_counter() - started
            row[f"old_{seed}"] = sum(OLD_WEIGHTS[k] * v for k, v in old.components.items()) / sum(
                OLD_WEIGHTS.values()
            )
            row[f"new_{seed}"] = new.score
            row.update({f"new_{k}_{seed}": v for k, v in new.components.items()})
        rows.append(row)
    y = [r["noc90"] for r in rows]
    keys = [k for k in rows[0] if k not in ("stem", "noc90") and not k.startswith("new_seconds")]
    versus_noc = {k: float(spearmanr([r[k] for r in rows], y)[0]) for k in keys}
    seeds = {
        k[:-2]: float(spearmanr([r[k] for r in rows], [r[k[:-2] + "_1"] for r in rows])[0])
        for k in keys
        if k.endswith("_0")
    }
    return {
        "machine": machine_description(),
        "start": start,
        "count": count,
        "probes": probes,
        "spearman_vs_noc90": versus_noc,
        "spearman_seed0_vs_seed1": seeds,
        "seconds_per_image_new": float(np.mean([r["new_seconds_0"] for r in rows])),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=90, help="first domain seed (90+: unused elsewhere)")
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--json", type=Path, default=Path("uncertainty_vs_noc.json"))
    args = parser.parse_args(argv)
    if args.count < 3 or args.start < 0:
        parser.error("--count must be at least 3 and --start not negative")
    result = measure(args.start, args.count)
    for key, rho in result["spearman_vs_noc90"].items():
        print(f"{key:28s} Spearman vs NoC@90 {rho:+.3f}")
    for key, rho in result["spearman_seed0_vs_seed1"].items():
        print(f"{key:28s} probe seed 0 vs 1 {rho:+.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Interactive latency on Ray Serve: simulated annotators against the running segmenter service.

Side by side, in one run, on one local Ray instance (127.0.0.1) with the segmenter deployed by
``workers.serve_cli.deploy`` (``--replicas`` Segmenter replicas at ``--num-cpus`` each):

1. **Serve, cache on** (the design): 1, 4 and 8 concurrent annotators; each annotator segments its
   own images with RITM's click simulator (``seemly.bench.simulator.next_click``), ``--rounds``
   clicks per image, through the backend's client (``backend.serve_client.ServeSegmenter``, HTTP
   to the Serve proxy). Latency per round, split into the first round on an image (embed +
   segment) and later rounds (segment only), both as the client sees it and inside the replica.
2. **Serve, recompute** (cache off): the same sessions with ``recompute=True`` on every request,
   i.e. embed + segment each round as the stateless Label Studio SAM examples do.
3. **Embed-heavy engine** (cache on vs recompute, 1 annotator): a clearly SYNTHETIC stand-in for a
   SAM-style engine, since no SAM engine exists in seemly yet: the classic engine registered as
   version ``classic-embed-heavy`` whose ``embed`` is padded with a sleep to ``--heavy-embed-s``
   seconds (``VersionSpec.synthetic_embed_s``). The default is a measured CPU forward pass of a
   ViT-B image encoder shaped like SAM's (86 M parameters, 1024 x 1024 input, 16 x 16 patches,
   windowed attention 14 with 4 global blocks; random weights) on this machine; ``--measure-vit``
   measures it again here. The sleep holds no CPU, so this row measures the latency structure
   (first vs later rounds), not CPU contention.
4. **In-process** (no Serve): ``backend.segmenter.InProcessSegmenter`` with the same engine and
   sessions, 1 annotator, and the Serve client over a ``DeploymentHandle`` (no HTTP proxy hop):
   what Serve itself costs per round.

Images are synthetic ``--width`` x ``--height`` photos-like scenes (textured background, one
object each at a distinct position, ground truth known). Prints markdown tables and the machine;
``--json`` writes every sample.

    .venv/bin/python benchmarks/interactive_latency.py                  # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/interactive_latency.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from backend.segmenter import ImageHandle, InProcessSegmenter
from backend.serve_client import ServeSegmenter
from seemly.bench.machine import cpu_model
from seemly.bench.simulator import SimClick, next_click
from seemly.engines.base import create_engine
from seemly.images import DecodedImage
from seemly.prompts import PromptRound, RoundResult

HEAVY = "classic-embed-heavy"
# A ViT-B (SAM image encoder shape) forward pass at 1024 x 1024 on this benchmark's machine
# (2-core AMD EPYC, torch 2.13 CPU, 2 threads): the median of 5 runs with --measure-vit (33-62 s on
# the shared, loaded machine); see docs/benchmarks.md.
DEFAULT_HEAVY_EMBED_S = 39.0
THINK_S = 0.0  # an annotator's pause between two clicks (--think-s); 0 = back to back (worst case)


# --- images and sessions -------------------------------------------------------------------------------
@dataclass
class Scene:
    index: int
    pixels: np.ndarray
    truth: np.ndarray

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.pixels.tobytes()).hexdigest()

    def handle(self) -> ImageHandle:
        height, width = self.truth.shape
        decoded = DecodedImage(self.pixels, self.sha256, width, height, "PNG")
        return ImageHandle(self.sha256, width, height, f"bench://{self.index}", lambda: decoded)


def make_scene(index: int, width: int, height: int, salt: str = "") -> Scene:
    """A textured background and one object (an ellipse with its own texture) at a place of its own."""
    rng = np.random.default_rng(int(hashlib.sha256(f"{index}{salt}".encode()).hexdigest()[:8], 16))
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    base = 110 + 35 * np.sin(xx / 13.0 + phase[0]) * np.cos(yy / 17.0 + phase[1])
    image = np.stack([base, base + 12 * np.sin(phase[2]), base - 10], axis=2) + rng.normal(
        0, 9, (height, width, 3)
    )
    golden = (index * 0.618034) % 1.0
    cx, cy = width * (0.2 + 0.6 * golden), height * (0.25 + 0.5 * ((index * 0.414214) % 1.0))
    axes = (int(width * rng.uniform(0.08, 0.16)), int(height * rng.uniform(0.1, 0.2)))
    truth = np.zeros((height, width), np.uint8)
    cv2.ellipse(truth, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    colour = rng.uniform(40, 220, 3)
    inside = truth > 0
    image[inside] = colour + 20 * np.sin(xx[inside, None] / 5.0) + rng.normal(0, 8, (int(inside.sum()), 3))
    return Scene(index, np.clip(image, 0, 255).astype(np.uint8), inside)


@dataclass
class Sample:
    mode: str
    annotators: int
    annotator: int
    image: int
    round: int  # 1 = first round on the image
    client_ms: float
    server_ms: float | None  # inside the replica (None in-process)
    embed_ms: float | None
    segment_ms: float | None
    cache_hit: bool | None
    iou: float


def run_session(
    segment: Callable[[ImageHandle, PromptRound, Sequence[RoundResult]], list[Any]],
    last: Callable[[], dict[str, Any]],
    scene: Scene,
    rounds: int,
    mode: str,
    annotators: int,
    annotator: int,
) -> list[Sample]:
    """One annotator on one image: ``rounds`` simulated clicks, each a round with the earlier as memory."""
    height, width = scene.truth.shape
    pred = np.zeros_like(scene.truth)
    not_clicked = np.ones(scene.truth.shape, np.float32)
    memory: list[RoundResult] = []
    samples = []
    handle = scene.handle()
    for number in range(1, rounds + 1):
        click = next_click(scene.truth, pred, None, not_clicked)
        if click is None:  # perfect already: click the object's centre again (keeps round counts equal)
            rows, cols = np.nonzero(scene.truth)
            click = SimClick(int(np.median(rows)), int(np.median(cols)), True)
        not_clicked[click.row, click.col] = 0
        prompt_round = PromptRound(prompts=[click.to_prompt()]).check_bounds(width, height)
        started = time.perf_counter()
        segments = segment(handle, prompt_round, tuple(memory))
        client_ms = (time.perf_counter() - started) * 1000.0
        if THINK_S and number < rounds:
            time.sleep(THINK_S)
        top = segments[0]
        pred = top.mask.data
        memory.append(RoundResult(prompt_round, top.mask, top.score))
        info = last()
        timings = info.get("timings_ms") or {}
        iou = float((pred & scene.truth).sum() / max(1, (pred | scene.truth).sum()))
        samples.append(
            Sample(
                mode,
                annotators,
                annotator,
                scene.index,
                number,
                client_ms,
                timings.get("total_ms"),
                timings.get("embed_ms"),
                timings.get("segment_ms"),
                info.get("cache_hit"),
                iou,
            )
        )
    return samples


def run_annotators(
    make_segmenter: Callable[[], tuple[Callable[..., list[Any]], Callable[[], dict[str, Any]]]],
    mode: str,
    annotators: int,
    images_each: int,
    rounds: int,
    width: int,
    height: int,
    salt: str,
) -> list[Sample]:
    """``annotators`` threads, each on ``images_each`` images of its own, all starting together."""
    barrier = threading.Barrier(annotators)

    def annotator(a: int) -> list[Sample]:
        segment, last = make_segmenter()
        scenes = [make_scene(1000 * a + i, width, height, salt) for i in range(images_each)]
        barrier.wait()
        out: list[Sample] = []
        for scene in scenes:
            out += run_session(segment, last, scene, rounds, mode, annotators, a)
        return out

    with ThreadPoolExecutor(annotators) as pool:
        return [s for chunk in pool.map(annotator, range(annotators)) for s in chunk]


# --- statistics -------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def row(samples: list[Sample], key: str) -> tuple[int, float, float, float, float]:
    client = [s.client_ms for s in samples]
    server = [getattr(s, key) for s in samples if getattr(s, key) is not None]
    return len(samples), pct(client, 0.5), pct(client, 0.99), pct(server, 0.5), pct(server, 0.99)


def fmt(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"  # NaN -> "-"


def table(samples: list[Sample]) -> str:
    lines = [
        "| mode | annotators | rounds | n | client p50 (ms) | client p99 (ms) | server p50 (ms) | server p99 (ms) "
        "| cache hits | mean IoU |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.mode, s.annotators), []).append(s)
    for (mode, annotators), group in groups.items():
        for label, chosen in (
            ("first", [s for s in group if s.round == 1]),
            ("later", [s for s in group if s.round > 1]),
        ):
            if not chosen:
                continue
            n, c50, c99, s50, s99 = row(chosen, "server_ms")
            iou = statistics.fmean(s.iou for s in chosen)
            flags = [s.cache_hit for s in chosen if s.cache_hit is not None]
            hits = f"{sum(flags)}/{len(flags)}" if flags else "-"
            lines.append(
                f"| {mode} | {annotators} | {label} | {n} | {fmt(c50)} | {fmt(c99)} | {fmt(s50)} | {fmt(s99)} "
                f"| {hits} | {iou:.3f} |"
            )
    return "\n".join(lines)


def machine() -> str:
    model = cpu_model("unknown CPU")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end of the run"
    )


def measure_overhead(url: str, width: int, height: int, salt: str, repeats: int) -> list[str]:
    """What Serve adds to one round: the same round on one cached image, paths interleaved."""
    scene = make_scene(7, width, height, "overhead" + salt)
    handle = scene.handle()
    local = InProcessSegmenter(create_engine("classic"))
    # A typical later round: the simulator's second click, with the first round as memory.
    first = PromptRound(prompts=[next_click(scene.truth, np.zeros_like(scene.truth)).to_prompt()])
    top = local.segment(handle, first)[0]
    memory = (RoundResult(first, top.mask, top.score),)
    second = next_click(scene.truth, top.mask.data) or SimClick(0, 0, False)
    prompt_round = PromptRound(prompts=[second.to_prompt()])
    http, via_handle = ServeSegmenter(url, timeout_s=600), ServeSegmenter("serve://segmenter", timeout_s=600)
    paths: dict[str, Callable[[], Any]] = {
        "in-process (InProcessSegmenter)": lambda: local.segment(handle, prompt_round, memory),
        "Serve, DeploymentHandle": lambda: via_handle.segment(handle, prompt_round, memory),
        "Serve, HTTP (proxy + ingress)": lambda: http.segment(handle, prompt_round, memory),
    }
    client: dict[str, list[float]] = {name: [] for name in paths}
    server: dict[str, list[float]] = {name: [] for name in paths}
    engine: dict[str, list[float]] = {name: [] for name in paths}
    for call in paths.values():  # warm: embed everywhere
        call()
    for _ in range(repeats):
        for name, call in paths.items():
            started = time.perf_counter()
            call()
            client[name].append((time.perf_counter() - started) * 1000.0)
            last = (via_handle if "Handle" in name else http).last_answer if "Serve" in name else {}
            timings = last.get("timings_ms") or {}
            if timings:
                server[name].append(timings["total_ms"])
                engine[name].append(timings["segment_ms"])
    lines = [
        f"Serve overhead: one cached {width}x{height} image, the same later round (a click + 1 round of "
        f"memory) {repeats} times per path, interleaved",
        "",
        "| path | client p50 (ms) | client p99 (ms) | replica p50 (ms) | engine segment p50 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in paths:
        lines.append(
            f"| {name} | {fmt(pct(client[name], 0.5))} | {fmt(pct(client[name], 0.99))} "
            f"| {fmt(pct(server[name], 0.5))} | {fmt(pct(engine[name], 0.5))} |"
        )
    http.close()
    via_handle.close()
    return lines


# --- the ViT-B measurement ---------------------------------------------------------------------------------
def measure_vit_b(threads: int = 2) -> float:
    """Seconds of one CPU forward pass of a SAM-shaped ViT-B image encoder (random weights) at 1024²."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int = 768, heads: int = 12, window: int = 14) -> None:
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.heads, self.window = heads, window

        def attend(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, c = x.shape
            y = self.n1(x)
            if self.window:
                s = self.window
                pad = (s - h % s) % s
                y = F.pad(y, (0, 0, 0, pad, 0, pad))
                hp = h + pad
                y = y.view(b, hp // s, s, hp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
                y = self.attend(y).view(b, hp // s, hp // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
                y = y.reshape(b, hp, hp, c)[:, :h, :w]
            else:
                y = self.attend(y.reshape(b, h * w, c)).view(b, h, w, c)
            x = x + y
            return x + self.mlp(self.n2(x))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 768, 16, 16)
            self.blocks = nn.ModuleList([Block(window=0 if i in (2, 5, 8, 11) else 14) for i in range(12)])
            self.neck = nn.Sequential(
                nn.Conv2d(768, 256, 1, bias=False), nn.Conv2d(256, 256, 3, padding=1, bias=False)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch(x).permute(0, 2, 3, 1)
            for block in self.blocks:
                x = block(x)
            return self.neck(x.permute(0, 3, 1, 2))

    torch.set_num_threads(threads)
    model = Encoder().eval()
    image = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))  # warm-up (allocator, kernels)
        started = time.perf_counter()
        model(image)
        return time.perf_counter() - started


# --- the run ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=481)
    parser.add_argument("--height", type=int, default=321)
    parser.add_argument("--rounds", type=int, default=5, help="clicks per image")
    parser.add_argument("--images", type=int, default=2, help="images per annotator")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="per Segmenter replica")
    parser.add_argument("--heavy-embed-s", type=float, default=DEFAULT_HEAVY_EMBED_S)
    parser.add_argument("--heavy-rounds", type=int, default=4)
    parser.add_argument("--measure-vit", action="store_true", help="measure the ViT-B embed here first")
    parser.add_argument("--quick", action="store_true", help="tiny run: checks that everything works")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--think-s", type=float, default=0.0, help="an annotator's pause between clicks")
    parser.add_argument(
        "--modes",
        default="cache,recompute,inprocess,overhead,heavy,router",
        help="which parts to run (comma-separated)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.images, args.rounds, args.heavy_embed_s, args.heavy_rounds = (
            "1,2",
            1,
            3,
            2.0,
            3,
        )

    modes = set(args.modes.split(","))
    global THINK_S
    THINK_S = args.think_s
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.measure_vit:
        args.heavy_embed_s = measure_vit_b()
        print(f"ViT-B (SAM-shaped) forward at 1024x1024 on this CPU: {args.heavy_embed_s:.1f} s")

    import ray
    from ray import serve

    from workers import serve_cli

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    port = _free_port()
    config = serve_cli.apply_overrides(
        serve_cli.base_config(host="127.0.0.1", port=port),
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        live={
            "engine": "classic",
            "versions": {HEAVY: {"engine": "classic", "synthetic_embed_s": args.heavy_embed_s}},
        },
    )
    serve_cli.deploy(config, wait_s=300)
    url = f"http://127.0.0.1:{port}/segment"
    samples: list[Sample] = []
    overhead: list[str] = []
    salt = str(time.time())  # fresh images (and so a cold cache) for every mode

    def serve_client(
        url: str = url, **options: Any
    ) -> Callable[[], tuple[Callable[..., list[Any]], Callable[[], dict[str, Any]]]]:
        def make() -> tuple[Callable[..., list[Any]], Callable[[], dict[str, Any]]]:
            client = ServeSegmenter(url, timeout_s=600, **options)
            return client.segment, lambda: client.last_answer

        return make

    def in_process() -> Callable[[], tuple[Callable[..., list[Any]], Callable[[], dict[str, Any]]]]:
        segmenter = InProcessSegmenter(create_engine("classic"))

        def make() -> tuple[Callable[..., list[Any]], Callable[[], dict[str, Any]]]:
            return segmenter.segment, lambda: {}

        return make

    try:
        # warm-up: imports and first-call costs in every replica, not measured
        run_annotators(
            serve_client(), "warm-up", max(2, args.replicas), 1, 2, args.width, args.height, "warm" + salt
        )
        run_annotators(in_process(), "warm-up", 1, 1, 2, args.width, args.height, "warm-ip" + salt)
        size = (args.width, args.height)
        concurrency = [int(c) for c in args.concurrency.split(",")]
        if "cache" in modes:
            for n in concurrency:
                print(f"serve, cache on: {n} annotator(s)", flush=True)
                samples += run_annotators(
                    serve_client(), "serve (cache)", n, args.images, args.rounds, *size, f"c{n}{salt}"
                )
        if "recompute" in modes:
            for n in [c for c in concurrency if c <= 4]:
                print(f"serve, recompute: {n} annotator(s)", flush=True)
                samples += run_annotators(
                    serve_client(recompute=True),
                    "serve (recompute)",
                    n,
                    args.images,
                    args.rounds,
                    *size,
                    f"r{n}{salt}",
                )
        if "inprocess" in modes:
            print("in-process and DeploymentHandle, 1 annotator", flush=True)
            samples += run_annotators(
                in_process(), "in-process (no Serve)", 1, args.images, args.rounds, *size, f"ip{salt}"
            )
            samples += run_annotators(
                serve_client("serve://segmenter"),
                "serve handle (cache)",
                1,
                args.images,
                args.rounds,
                *size,
                f"h{salt}",
            )
        if "heavy" in modes:
            print(f"embed-heavy (synthetic {args.heavy_embed_s:.1f} s embed), 1 annotator", flush=True)
            heavy = f"embed-heavy {args.heavy_embed_s:.0f}s"
            samples += run_annotators(
                serve_client(model_version=HEAVY),
                f"{heavy} (cache)",
                1,
                1,
                args.heavy_rounds,
                *size,
                f"hc{salt}",
            )
            samples += run_annotators(
                serve_client(model_version=HEAVY, recompute=True),
                f"{heavy} (recompute)",
                1,
                1,
                args.heavy_rounds,
                *size,
                f"hr{salt}",
            )
        if "overhead" in modes:
            print("overhead: one cached image, the same round repeated on each path", flush=True)
            overhead = measure_overhead(url, args.width, args.height, salt, repeats=40)
        if "router" in modes and args.replicas > 1:
            # The same service with Serve's default router (power of two choices) instead of image affinity.
            n = 4
            print(f"serve, cache on, Serve's default router (no image affinity), {n} annotators", flush=True)
            serve.delete("segmenter")
            serve_cli.deploy(serve_cli.apply_overrides(config, app_args={"affinity": False}), wait_s=300)
            run_annotators(serve_client(), "warm-up", 2, 1, 2, *size, "warm-na" + salt)
            samples += run_annotators(
                serve_client(),
                "serve (cache, default router)",
                n,
                args.images,
                args.rounds,
                *size,
                f"na{salt}",
            )
    finally:
        serve.delete("segmenter")
        serve.shutdown()
        ray.shutdown()

    print()
    print(f"machine: {machine()}")
    print(
        f"images {args.width}x{args.height}, {args.rounds} clicks each, {args.images} image(s) per annotator, "
        f"think time {args.think_s:g} s; "
        f"{args.replicas} Segmenter replicas x {args.num_cpus} CPU; client = backend.serve_client over HTTP "
        "unless 'handle'; server = inside the replica"
    )
    print()
    print(table(samples))
    print()
    if overhead:
        print("\n".join(overhead))
        print()
    for mode_prefix in ("embed-heavy", "serve ("):
        cache = [
            s
            for s in samples
            if s.mode.startswith(mode_prefix)
            and "cache" in s.mode
            and s.round > 1
            and (mode_prefix != "serve (" or s.annotators == 1)
        ]
        recompute = [
            s
            for s in samples
            if s.mode.startswith(mode_prefix) and "recompute" in s.mode and s.round > 1 and s.annotators == 1
        ]
        if cache and recompute:
            ratio = pct([s.client_ms for s in recompute], 0.5) / pct([s.client_ms for s in cache], 0.5)
            print(
                f"{mode_prefix.strip(' (')}: later rounds, recompute p50 / cache p50 = {ratio:.1f}x (1 annotator)"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": vars(args) | {"json": str(args.json)},
                    "samples": [asdict(s) for s in samples],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

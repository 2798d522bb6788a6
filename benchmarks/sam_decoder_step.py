"""Cost of one SAM mask-decoder fine-tuning step, on random embeddings (docs/learning.md).

The decoder is the same for every official SAM (ViT-B/L/H: 256-channel 64 x 64 embeddings, ~4 M
parameters), so its cost per step does not depend on the encoder: this builds a SAM with ViT-B's
prompt encoder and decoder (random weights; the encoder cut to one block, as it never runs), feeds
the decoder random 1 x 256 x 64 x 64 embeddings and times
the real training step (:func:`seemly.learning.sam_decoder.run_sessions` with back-propagation:
prompt simulation, prompt encoder, decoder forward + backward, losses) and the optimiser step.

    .venv/bin/python benchmarks/sam_decoder_step.py [--preset vit_b|tiny] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from seemly.engines.sam import SAM_PRESETS, require_segment_anything
from seemly.learning.sam_decoder import DecoderFitConfig, run_sessions
from seemly.learning.sam_images import EmbeddedImage
from seemly.learning.sam_losses import low_res_target


def synthetic_image(model: torch.nn.Module, rng: np.random.Generator, regions: int) -> EmbeddedImage:
    """Random embeddings and ``regions`` disc masks on a 4:3 image in the model's input frame."""
    img_size = int(model.image_encoder.img_size)
    grid = img_size // 16
    channels = int(model.prompt_encoder.embed_dim)
    low = tuple(int(v) for v in model.prompt_encoder.mask_input_size)
    height, width = img_size * 3 // 4, img_size
    yy, xx = np.mgrid[:height, :width]
    gts = []
    for _ in range(regions):
        cy, cx, r = (
            rng.uniform(0.3, 0.7) * height,
            rng.uniform(0.3, 0.7) * width,
            rng.uniform(0.1, 0.25) * height,
        )
        gts.append((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
    maps = [low_res_target(g, img_size, low) for g in gts]  # type: ignore[arg-type]
    return EmbeddedImage(
        torch.randn(1, channels, grid, grid),
        gts,
        torch.from_numpy(np.stack([t for t, _ in maps]))[:, None],
        torch.from_numpy(maps[0][1])[None, None],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vit_b", choices=["vit_b", "tiny"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    require_segment_anything()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    architecture = dataclasses.replace(
        SAM_PRESETS[args.preset], encoder_depth=1, encoder_global_attn_indexes=(0,)
    )  # the encoder never runs here: one block builds in a second instead of minutes
    model = architecture.build().eval()
    decoder = model.mask_decoder.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("mask_decoder."))
    config = DecoderFitConfig()  # the defaults: 4 images x 2 sessions x 5 rounds per step
    rng = np.random.default_rng(0)
    images = [synthetic_image(model, rng, config.sessions) for _ in range(config.batch)]
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr)
    scale = 1.0 / (config.batch * config.rounds)
    times = []
    for step in range(args.steps + 1):  # the first step warms up
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for index, item in enumerate(images):
            run_sessions(
                model, decoder, item, range(config.sessions), index % 2 == 1, rng, config, scale=scale
            )
        optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    passes = config.batch * config.rounds
    result = {
        "preset": args.preset,
        "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
        "step": f"{config.batch} images x {config.sessions} sessions x {config.rounds} rounds",
        "ms_per_step": round(1000 * float(np.median(times)), 1),
        "ms_per_decoder_pass": round(1000 * float(np.median(times)) / passes, 1),
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

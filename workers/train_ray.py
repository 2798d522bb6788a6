"""Ray Train plumbing of ``seemly train run``: one ``TorchTrainer`` whatever model trains.

:func:`fit_on_ray` runs a train loop on ``SEEMLY_TRAIN_NUM_WORKERS`` workers (fractional CPUs, a GPU
each when the cluster has GPUs), with checkpoints under ``<artifacts>/ray_train`` (a local folder or
the artifacts' S3 bucket), and returns the bytes of one file of the last checkpoint. The loops:

* :func:`refiner_loop`: the classic engine's refiner (``seemly.learning.fit.fit_refiner``) on this
  worker's shard of the simulated examples;
* :func:`sam_decoder_loop`: SAM's mask decoder (``seemly.learning.sam_decoder.fit_decoder``): the
  worker loads the base SAM checkpoint itself (its URI must be readable from every node: ``s3://``
  or a shared folder), encodes its shard of the images once and fine-tunes the decoder.

Both report every epoch's metrics, rank 0 with a checkpoint holding the model file, and wrap the
model with ``ray.train.torch.prepare_model`` (DDP beyond one worker).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seemly.config import Settings
from seemly.learning.artifacts import artifacts_root, local_root
from workers.presegment import ensure_ray
from workers.train_slot import TrainingError

REFINER_FILE = "refiner.pt"
DECODER_FILE = "mask_decoder.pt"


def report_epoch(metrics: dict[str, Any], file_name: str, data: Callable[[], bytes]) -> None:
    """``ray.train.report`` of one epoch; rank 0 adds a checkpoint holding ``file_name``."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / file_name).write_bytes(data())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def refiner_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: fit the refiner on this worker's shard; report every epoch with a checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    from seemly.learning.fit import FitConfig, fit_refiner
    from seemly.learning.refiner import LearnedRefiner

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    examples = ray.get(config["examples"])[rank::size]
    init = LearnedRefiner.from_bytes(config["init"], source="parent refiner") if config.get("init") else None

    def report(metrics: dict[str, Any], snapshot: LearnedRefiner) -> None:
        report_epoch(metrics, REFINER_FILE, snapshot.to_bytes)

    fit_refiner(
        examples,
        FitConfig(**config["fit"]),
        init=init,
        prepare_model=ray.train.torch.prepare_model,
        report=report,
    )


def sam_decoder_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: load the base SAM, encode this worker's images once, fine-tune the decoder."""
    import functools

    import ray
    import ray.train
    import ray.train.torch

    from seemly.engines.base import create_engine
    from seemly.learning.sam_artifact import decoder_bytes
    from seemly.learning.sam_decoder import DecoderFitConfig, fit_decoder

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    everything = ray.get(config["images"])
    images = everything[rank::size] or everything  # more workers than images: all take part in DDP
    engine = create_engine(
        "sam",
        checkpoint=config["checkpoint"],
        device=str(ray.train.torch.get_device()),
        precision="fp32",
        storage=ray.get(config["storage"]),
    )

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        report_epoch(metrics, DECODER_FILE, lambda: decoder_bytes(state))

    fit_decoder(
        engine,
        images,
        DecoderFitConfig(**config["fit"]),
        regions_per_worker=-(-int(config["regions"]) // size),
        rank=rank,
        # the single-output and three-candidate rounds leave some output heads without a gradient
        prepare_model=functools.partial(
            ray.train.torch.prepare_model, parallel_strategy_kwargs={"find_unused_parameters": True}
        ),
        report=report,
    )


def run_config(settings: Settings, name: str) -> Any:
    """Checkpoints under ``<artifacts>/ray_train``: a local folder, or the S3 bucket of the artifacts."""
    from ray.train import CheckpointConfig, RunConfig

    checkpoints = CheckpointConfig(num_to_keep=1)
    root = local_root(settings)
    if root is not None:
        return RunConfig(name=name, storage_path=str(root / "ray_train"), checkpoint_config=checkpoints)
    from pyarrow import fs

    bucket_prefix = artifacts_root(settings).removeprefix("s3://")
    key = settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    endpoint = settings.s3_endpoint_url
    filesystem = fs.S3FileSystem(
        access_key=key,
        secret_key=secret,
        region=settings.s3_region,
        endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None,
        scheme=endpoint.split("://", 1)[0] if endpoint and "://" in endpoint else "https",
    )
    return RunConfig(
        name=name,
        storage_path=f"{bucket_prefix}/ray_train",
        storage_filesystem=filesystem,
        checkpoint_config=checkpoints,
    )


def fit_on_ray(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    file_name: str,
    settings: Settings,
    *,
    objects: dict[str, Any] | None = None,
    num_workers: int | None,
    use_gpu: bool | None,
    name: str,
) -> tuple[bytes, dict[str, Any]]:
    """Run ``loop`` on a ``TorchTrainer``; returns ``file_name`` of its last checkpoint and the metrics.

    ``objects`` (examples, images, a storage with credentials) go through the object store: the
    loop gets object refs under the same keys, and nothing large or secret lands in the run's
    pickled config."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(settings)
    loop_config = {**loop_config, **{key: ray.put(value) for key, value in (objects or {}).items()}}
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = use_gpu if use_gpu is not None else gpus > 0
    workers = num_workers or settings.train_num_workers
    resources: dict[str, float] = {"CPU": settings.ray_num_cpus_per_actor}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config(settings, name),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingError(
            f"Ray Train run {name} ended without a checkpoint: {result.error or 'no epoch finished'}"
        )
    with result.checkpoint.as_directory() as folder:
        data = (Path(folder) / file_name).read_bytes()
    metrics = dict(result.metrics or {})
    metrics.update({"workers": workers, "use_gpu": use_gpu})
    return data, metrics

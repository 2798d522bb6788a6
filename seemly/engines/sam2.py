"""SAM 2 / SAM 2.1 (``sam2`` 1.1.0) image segmentation behind the engine protocol, with user-supplied weights.

The model is built by the official ``sam2.build_sam.build_sam2`` from the package's own hydra
configuration (``configs/sam2.1/sam2.1_hiera_t.yaml`` ...), then loaded through
:mod:`seemly.engines.checkpoints` (``weights_only``, the ``{"model": ...}`` wrapper SAM 2 ships, an
architecture check that names the offending keys). Everything else follows
``sam2.sam2_image_predictor.SAM2ImagePredictor``:

* **embed** = ``set_image``: SAM 2's transforms (resize to ``image_size`` square, normalisation), the
  Hiera image encoder and FPN neck, ``no_mem_embed`` added; the :class:`~seemly.engines.sam.SamState`
  keeps the image embedding and the high-resolution features on the engine's device;
* **segment** = ``predict`` on those features, with exactly the prompt rules of the ``sam`` engine
  (clicks of all rounds, latest box, scribble and polygon points, mask prompts and the previous
  round's low-res logits as mask input, multimask only for a single click; see
  :mod:`seemly.engines.sam`); SAM 2's decoder falls back to its multimask tokens when a single
  mask is unstable (``dynamic_multimask_via_stability``, the official default);
* **segment_everything** = the official ``SAM2AutomaticMaskGenerator`` on the cached features.

``model_type``: ``auto`` (default: recognised from the state dict among the official
configurations below), or one of :data:`SAM2_PRESETS`: ``sam2.1_hiera_t`` / ``_s`` / ``_b+`` / ``_l``,
the same for ``sam2_hiera_*`` (SAM 2.0), and ``micro`` (a test-sized configuration for random-weight
tests). Other architectures: ``config="configs/sam2.1/sam2.1_hiera_l.yaml"`` plus hydra
``overrides=["++model.image_size=512", ...]``. ``model_version`` is ``sam2-<model_type>-<sha256[:8]>``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from seemly.engines import checkpoints
from seemly.engines.base import EngineError, register_engine
from seemly.engines.sam import PromptableEngine, SamState, binary_to_logits, dummy_image

if TYPE_CHECKING:
    import torch

MICRO_OVERRIDES: tuple[str, ...] = (
    # A test-sized SAM 2.1 (random weights in the tests): 128 px input, 5 Hiera blocks of width 8,
    # 32-d neck and heads, 1-layer memory modules (unused for images, but part of the state dict).
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=32",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
)


def _presets() -> dict[str, tuple[str, tuple[str, ...]]]:
    presets: dict[str, tuple[str, tuple[str, ...]]] = {}
    for size in ("t", "s", "b+", "l"):
        presets[f"sam2.1_hiera_{size}"] = (f"configs/sam2.1/sam2.1_hiera_{size}.yaml", ())
        presets[f"sam2_hiera_{size}"] = (f"configs/sam2/sam2_hiera_{size}.yaml", ())
    presets["micro"] = ("configs/sam2.1/sam2.1_hiera_t.yaml", MICRO_OVERRIDES)
    return presets


SAM2_PRESETS: dict[str, tuple[str, tuple[str, ...]]] = _presets()
"""model_type -> (hydra config name inside the sam2 package, hydra overrides)."""

# (trunk embed_dim, trunk blocks, neck d_model) -> size suffix, for model_type="auto"
_SIGNATURES = {(96, 12, 256): "t", (96, 16, 256): "s", (112, 24, 256): "b+", (144, 48, 256): "l"}


def detect_preset(state_dict: Mapping[str, Any], uri: str = "") -> str:
    """The official configuration a SAM 2 state dict belongs to (raises when none fits)."""
    try:
        embed_dim = int(state_dict["image_encoder.trunk.patch_embed.proj.weight"].shape[0])
        d_model = int(state_dict["image_encoder.neck.convs.0.conv.weight"].shape[0])
    except (KeyError, IndexError, AttributeError) as exc:
        first = ", ".join(list(state_dict)[:5])
        raise checkpoints.CheckpointArchitectureError(
            f"checkpoint {uri} does not look like a SAM 2 checkpoint: no {exc} (first keys: {first or 'none'}); "
            "for SAM (segment-anything) use the sam engine"
        ) from None
    prefix = "image_encoder.trunk.blocks."
    blocks = len({k[len(prefix) :].split(".", 1)[0] for k in state_dict if k.startswith(prefix)})
    version = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
    if (embed_dim, blocks, d_model) == (8, 5, 32):
        return "micro"
    size = _SIGNATURES.get((embed_dim, blocks, d_model))
    if size is None:
        raise checkpoints.CheckpointArchitectureError(
            f"checkpoint {uri}: a SAM 2 model with a {blocks}-block Hiera of width {embed_dim} and a "
            f"{d_model}-d neck matches no official configuration; pass config=... and overrides=[...]"
        )
    return f"{version}_hiera_{size}"


def require_sam2() -> Any:
    """Import ``sam2`` (with the torchvision shim when needed) or explain how to install it."""
    from seemly.engines.torchvision_compat import ensure_torchvision

    ensure_torchvision()
    try:
        import sam2
        import sam2.automatic_mask_generator  # imports torchvision.ops: fail here, not later
        import sam2.build_sam
        import sam2.sam2_image_predictor
    except ModuleNotFoundError as exc:
        raise EngineError(
            f"the sam2 engine needs the optional package sam2 and its dependencies ({exc}): see "
            "docs/engines.md (pip install 'seemly[sam]' && pip install --no-deps sam2==1.1.0)"
        ) from exc
    return sam2


@functools.cache
def _state_predictor_class() -> type:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    class StateSam2Predictor(SAM2ImagePredictor):
        """``SAM2ImagePredictor`` serving a cached :class:`SamState` instead of encoding an image.

        Made by copying a template predictor (whose transforms are already ``torch.jit.script``-ed).
        """

        _state: SamState

        def _load(self) -> None:
            self._features = self._state.features
            self._orig_hw = [(self._state.height, self._state.width)]
            self._is_image_set = True
            self._is_batch = False

        def set_image(self, image: Any) -> None:
            if tuple(np.asarray(image).shape[:2]) != (self._state.height, self._state.width):
                raise EngineError("automatic mask generation on crops is not supported (crop_n_layers=0)")
            self._load()

    return StateSam2Predictor


@register_engine("sam2")
class Sam2Engine(PromptableEngine):
    """SAM 2 / 2.1 with user-supplied weights; see the module docstring."""

    name = "sam2"
    family_label = "SAM 2"

    def _import_package(self) -> None:
        require_sam2()

    def _build_model(
        self, state_dict: dict[str, Any], model_type: str | None, options: Mapping[str, Any]
    ) -> tuple[torch.nn.Module, str]:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        uri = self.checkpoint.uri
        config = options.get("config")
        overrides: Sequence[str] = tuple(options.get("overrides") or ())
        if config:
            model_type = (
                model_type
                if model_type not in (None, "", "auto")
                else str(config).rsplit("/", 1)[-1].removesuffix(".yaml")
            )
        else:
            if model_type in (None, "", "auto"):
                model_type = detect_preset(state_dict, checkpoints._shown(uri))
            if model_type not in SAM2_PRESETS:
                raise EngineError(
                    f"unknown SAM 2 model_type {model_type!r}; use auto or one of {', '.join(SAM2_PRESETS)}"
                )
            config, preset_overrides = SAM2_PRESETS[model_type]
            overrides = (*preset_overrides, *overrides)
        try:
            model = build_sam2(
                str(config), ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=list(overrides)
            )
        except Exception as exc:  # hydra: unknown config name, bad override
            raise EngineError(
                f"cannot build SAM 2 from config {config!r}: {type(exc).__name__}: {exc}"
            ) from exc
        checkpoints.load_into(model, state_dict, f"SAM 2 {model_type}", uri)
        size = int(model.image_size)
        self._template = SAM2ImagePredictor(model)
        # The official predictor assumes 1024 px inputs; its feature sizes follow the model's own.
        self._template._bb_feat_sizes = [
            (size // 4, size // 4),
            (size // 8, size // 8),
            (size // 16, size // 16),
        ]
        return model, str(model_type)

    @property
    def prompt_encoder(self) -> torch.nn.Module:
        return self.model.sam_prompt_encoder

    def predictor(self, state: SamState | None = None, template: Any = None) -> Any:
        """A fresh official predictor (cheap copy of a template), "set" to ``state`` when given."""
        base = template if template is not None else self._template
        predictor = _state_predictor_class().__new__(_state_predictor_class())
        predictor.__dict__.update(base.__dict__)
        predictor._bb_feat_sizes = self._template._bb_feat_sizes
        if state is not None:
            predictor._state = state
            predictor._load()
        return predictor

    def _embed(self, image: np.ndarray) -> tuple[Any, tuple[int, int]]:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = copy.copy(self._template)
        SAM2ImagePredictor.set_image(predictor, image)
        size = int(self.model.image_size)
        return predictor._features, (size, size)

    def _predict(
        self,
        state: SamState,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        predictor = self.predictor(state)
        masks, scores, low_res = predictor.predict(
            point_coords=coords,
            point_labels=labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask,
            return_logits=False,
            normalize_coords=True,
        )
        return (
            np.asarray(masks) > 0.5,
            np.asarray(scores, dtype=np.float32),
            np.asarray(low_res, dtype=np.float32),
        )

    def _logits_from_mask(self, state: SamState, mask: np.ndarray) -> np.ndarray:
        # SAM 2 squeezes the whole image into its square input: the mask goes the same way.
        low_h, low_w = (int(v) for v in self.model.sam_prompt_encoder.mask_input_size)
        small = cv2.resize(mask.astype(np.float32), (low_w, low_h), interpolation=cv2.INTER_AREA)
        return binary_to_logits(small)[None]

    def _everything(self, state: SamState) -> list[dict[str, Any]]:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        template = self._generator_template(
            lambda: SAM2AutomaticMaskGenerator(self.model, **self.everything_options)
        )
        generator = copy.copy(template)
        generator.predictor = self.predictor(state, template=template.predictor)
        return generator.generate(dummy_image(state.height, state.width))

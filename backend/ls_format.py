"""Label Studio JSON ⇄ seemly types: the Label Studio format lives here and nowhere else.

Coordinates. Label Studio gives every position in percent of the image as displayed (upright, EXIF
applied, which is also what :func:`seemly.images.decode_image` returns). A percentage ``p`` along an
image ``W`` pixels wide is the continuous pixel coordinate ``p * W / 100`` exactly (see
:mod:`seemly.prompts`): no rounding, no half-pixel shift. A value outside ``[0, 100]`` (beyond a tiny
float tolerance) is an error, never silently clamped.

In (prompts, from ``params.context.result`` of ``/predict``):

=================  ==========================================================================
``keypointlabels``  a :class:`~seemly.prompts.Click`; negative when the tag is a negative tag or
                    the result says ``"is_positive": false`` (Alt+click in Label Studio)
``rectanglelabels`` a :class:`~seemly.prompts.Box` (a rotated rectangle becomes its bounding box)
``textarea``        text (``value.text`` is a list of strings); an empty text clears it
``brushlabels``     a :class:`~seemly.prompts.MaskPrompt` (Label Studio brush RLE decoded)
``polygonlabels``   a :class:`~seemly.prompts.Polygon`
=================  ==========================================================================

Out (answers): a ``brushlabels`` result carrying Label Studio brush RLE, and ``polygonlabels``
results (one per outer ring, points in percent) when the config has a ``<PolygonLabels>`` tag.

Every error is a :class:`~seemly.prompts.PromptError` whose ``field`` is the JSON path of the bad
value (``params.context.result[1].value.x``), so the HTTP layer can answer a precise 422.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from plugin.labeling_config import ControlTag, ParsedConfig
from seemly.engines.base import Segment
from seemly.masks import Mask, MaskError, signed_area
from seemly.prompts import MAX_TEXT_CHARS, Box, Click, MaskPrompt, Polygon, PromptError

PERCENT_TOLERANCE = 1e-6
"""Label Studio's own float arithmetic can land a hair past 100 %; that much is forgiven (and clamped)."""

MAX_CONTEXT_RESULTS = 1000


# --- small helpers -------------------------------------------------------------------------------


def percent_to_px(percent: float, size: int) -> float:
    """A Label Studio percentage along an axis of ``size`` pixels -> continuous pixel coordinate."""
    return percent * size / 100.0


def px_to_percent(px: float, size: int) -> float:
    return px * 100.0 / size


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PromptError(path, f"must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise PromptError(path, "must be a finite number")
    return number


def _percent(value: Any, path: str) -> float:
    """A coordinate in percent: in ``[0, 100]`` (tolerance :data:`PERCENT_TOLERANCE`), clamped."""
    number = _number(value, path)
    if number < -PERCENT_TOLERANCE:
        raise PromptError(
            path, f"{number:g} % is negative: Label Studio coordinates are 0..100 % of the image"
        )
    if number > 100.0 + PERCENT_TOLERANCE:
        raise PromptError(path, f"{number:g} % is over 100 %: the point lies outside the image")
    return min(max(number, 0.0), 100.0)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PromptError(path, f"must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def ls_project_id(value: Any) -> int:
    """Label Studio's project field: ``"12.1700000000"`` (id.created-timestamp), ``12`` or ``"12"``."""
    if isinstance(value, bool):
        raise PromptError("project", 'must be a project id like "12.1700000000"')
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.split(".", 1)[0].isdigit():
        number = int(value.split(".", 1)[0])
    elif (
        isinstance(value, Mapping)
        and isinstance(value.get("id"), int)
        and not isinstance(value.get("id"), bool)
    ):
        number = int(value["id"])
    else:
        raise PromptError("project", f'must be a project id like "12.1700000000", got {_json_type(value)}')
    if number < 1 or number >= 2**63:
        raise PromptError("project", f"project id {number} is out of range")
    return number


def task_id(task: Mapping[str, Any], path: str) -> int:
    value = task.get("id")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**63:
        raise PromptError(f"{path}.id", "every task needs an integer id")
    return int(value)


def image_uri(task: Mapping[str, Any], config: ParsedConfig, path: str = "tasks[0]") -> str:
    """The image URL of a task: ``task.data[<Image value="$key">]``."""
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise PromptError(f"{path}.data", "the task has no data object")
    key = config.image.data_key
    value = data.get(key)
    if value is None:
        raise PromptError(
            f"{path}.data.{key}",
            f"the task has no image: its data lacks the field {key!r} that the labeling config's "
            f'<Image name="{config.image.name}" value="{config.image.value}"> reads',
        )
    if not isinstance(value, str) or not value.strip():
        raise PromptError(
            f"{path}.data.{key}", f"the image field must be a URL string, got {_json_type(value)}"
        )
    return value.strip()


def annotator_of(params: Mapping[str, Any], context: Mapping[str, Any], task: Mapping[str, Any]) -> str:
    """Who is prompting: Label Studio does not say so directly, so look where it leaves traces.

    In order: ``context.user`` / ``params.user`` (explicit, e.g. from our own clients), then the task's
    ``drafts`` (Label Studio serialises only the requesting user's drafts for interactive requests),
    else ``"anonymous"``. Sessions are also keyed by task, so annotators on different tasks never
    share state even when they cannot be told apart.
    """
    for source in (context.get("user"), context.get("annotator"), params.get("user")):
        if isinstance(source, str | int) and not isinstance(source, bool) and str(source).strip():
            return str(source).strip()[:255]
        if isinstance(source, Mapping):
            for key in ("id", "email", "username"):
                if isinstance(source.get(key), str | int) and not isinstance(source.get(key), bool):
                    return str(source[key])[:255]
    drafts = task.get("drafts")
    if isinstance(drafts, list):
        for draft in drafts:
            if isinstance(draft, Mapping) and isinstance(draft.get("user"), str | int):
                user = str(draft["user"]).strip()
                if user:
                    return user[:255]
    return "anonymous"


# --- context -> prompts --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextItem:
    """One region of the context as a prompt, with what identifies it across requests."""

    region_id: str | None
    """Label Studio's region id: the same region re-sent (moved, or as part of its group) keeps it."""
    group: tuple[str, str]
    """(result type, label): Label Studio re-sends all smart regions of one type and label together."""
    prompt: Click | Box | Polygon | MaskPrompt

    @property
    def is_region(self) -> bool:
        """A box, polygon or mask: it describes a whole object."""
        return not isinstance(self.prompt, Click)


@dataclass
class ParsedContext:
    """What one interactive request asked for, in pixels."""

    items: list[ContextItem] = field(default_factory=list)
    text: str | None = None
    """The text typed this round: ``None`` when there was no text result, ``""`` when it was cleared."""
    label: str | None = None
    """The label of the positive prompts (the class being segmented), if they carry one."""

    @property
    def visual(self) -> list[Click | Box | Polygon | MaskPrompt]:
        return [item.prompt for item in self.items]

    @property
    def region_prompt(self) -> bool:
        """A box, polygon or mask prompt is present."""
        return any(item.is_region for item in self.items)

    @property
    def empty(self) -> bool:
        """Nothing at all: Label Studio re-sent a group whose last region was deleted."""
        return not self.items and self.text is None


def _labels_of(value: Mapping[str, Any], tag: ControlTag, path: str) -> list[str]:
    key = tag.result_type
    labels = value.get(key)
    if labels is None:
        return []
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise PromptError(f"{path}.value.{key}", "must be a list of label names")
    if tag.labels:
        for label in labels:
            if label not in tag.labels:
                raise PromptError(
                    f"{path}.value.{key}",
                    f'unknown label {label!r}: the <{tag.kind} name="{tag.name}"> tag has '
                    f"{', '.join(repr(x) for x in tag.labels)}",
                )
    return labels


def _check_size(item: Mapping[str, Any], path: str, width: int, height: int) -> None:
    """A result drawn on an image of another size would land in the wrong place: refuse it."""
    ow, oh = item.get("original_width"), item.get("original_height")
    if ow is None or oh is None:
        return
    if (
        isinstance(ow, bool)
        or isinstance(oh, bool)
        or not isinstance(ow, int | float)
        or not isinstance(oh, int | float)
    ):
        raise PromptError(f"{path}.original_width", "original_width and original_height must be numbers")
    if (round(ow), round(oh)) != (width, height):
        raise PromptError(
            f"{path}.original_width",
            f"the region was drawn on a {round(ow)}x{round(oh)} image but the task's image is {width}x{height}",
        )


def parse_context(
    context: Mapping[str, Any], config: ParsedConfig, width: int, height: int, path: str = "params.context"
) -> ParsedContext:
    """Turn ``params.context`` of an interactive ``/predict`` into pixel prompts for a ``width x height`` image."""
    results = context.get("result")
    if not isinstance(results, list):
        raise PromptError(f"{path}.result", f"must be a list of regions, got {_json_type(results)}")
    if len(results) > MAX_CONTEXT_RESULTS:
        raise PromptError(f"{path}.result", f"has {len(results)} regions, at most {MAX_CONTEXT_RESULTS}")
    parsed = ParsedContext()
    positive_labels: list[str] = []
    for index, raw in enumerate(results):
        item_path = f"{path}.result[{index}]"
        item = _mapping(raw, item_path)
        from_name = item.get("from_name")
        try:
            tag = config.control(str(from_name))
        except KeyError:
            usable = ", ".join(t.name for t in config.controls)
            raise PromptError(
                f"{item_path}.from_name",
                f"{from_name!r} is not a tag seemly reads prompts from (this labeling config has: {usable})",
            ) from None
        kind = item.get("type")
        if isinstance(kind, str) and kind.lower() != tag.result_type:
            raise PromptError(
                f"{item_path}.type", f'{kind!r} does not match the <{tag.kind} name="{tag.name}"> tag'
            )
        value = _mapping(item.get("value"), f"{item_path}.value")
        vpath = f"{item_path}.value"
        if tag.role == "text":
            parsed.text = _text(value, vpath)
            continue
        _check_size(item, item_path, width, height)
        labels = _labels_of(value, tag, item_path)
        rid = item.get("id")
        region_id = (
            str(rid)[:64] if isinstance(rid, str | int) and not isinstance(rid, bool) and str(rid) else None
        )
        group = (tag.result_type, labels[0] if labels else "")
        prompt: Click | Box | Polygon | MaskPrompt
        if tag.role == "point":
            x = percent_to_px(_percent(value.get("x"), f"{vpath}.x"), width)
            y = percent_to_px(_percent(value.get("y"), f"{vpath}.y"), height)
            positive = config.point_is_positive(item)
            prompt = Click(x=x, y=y, positive=positive)
            if positive:
                positive_labels += labels
        elif tag.role == "box":
            prompt = _box(value, vpath, width, height)
            positive_labels += labels
        elif tag.role == "polygon":
            prompt = _polygon(value, vpath, width, height)
            positive_labels += labels
        else:  # mask
            prompt = _mask(value, vpath, width, height)
            positive_labels += labels
        parsed.items.append(ContextItem(region_id, group, prompt))
    if positive_labels:
        parsed.label = positive_labels[-1]
    return parsed


def _text(value: Mapping[str, Any], path: str) -> str:
    text = value.get("text")
    if isinstance(text, str):
        parts = [text]
    elif isinstance(text, list) and all(isinstance(t, str) for t in text):
        parts = text
    else:
        raise PromptError(f"{path}.text", "must be a list of strings")
    # Label Studio lists every line submitted so far; the last non-empty one is the current prompt.
    lines = [" ".join(part.split()) for part in parts]
    current = next((line for line in reversed(lines) if line), "")
    if len(current) > MAX_TEXT_CHARS:
        raise PromptError(f"{path}.text", f"the text prompt is longer than {MAX_TEXT_CHARS} characters")
    return current


def _box(value: Mapping[str, Any], path: str, width: int, height: int) -> Box:
    x = _percent(value.get("x"), f"{path}.x")
    y = _percent(value.get("y"), f"{path}.y")
    w = _percent(value.get("width"), f"{path}.width")
    h = _percent(value.get("height"), f"{path}.height")
    rotation = _number(value.get("rotation", 0) or 0, f"{path}.rotation")
    if w <= 0 or h <= 0:
        raise PromptError(f"{path}.width", "the rectangle has no area (width and height must be positive)")
    x0, y0 = percent_to_px(x, width), percent_to_px(y, height)
    w_px, h_px = percent_to_px(w, width), percent_to_px(h, height)
    if rotation % 360 == 0:
        if x + w > 100.0 + PERCENT_TOLERANCE:
            raise PromptError(
                f"{path}.width", f"x + width = {x + w:g} % is over 100 %: the box leaves the image"
            )
        if y + h > 100.0 + PERCENT_TOLERANCE:
            raise PromptError(
                f"{path}.height", f"y + height = {y + h:g} % is over 100 %: the box leaves the image"
            )
        return Box(x0=x0, y0=y0, x1=min(x0 + w_px, float(width)), y1=min(y0 + h_px, float(height)))
    # Label Studio rotates a rectangle about its top-left corner (x, y), clockwise on screen.
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    corners = [(0.0, 0.0), (w_px, 0.0), (w_px, h_px), (0.0, h_px)]
    xs = [x0 + cx * cos - cy * sin for cx, cy in corners]
    ys = [y0 + cx * sin + cy * cos for cx, cy in corners]
    bx0, bx1 = max(min(xs), 0.0), min(max(xs), float(width))
    by0, by1 = max(min(ys), 0.0), min(max(ys), float(height))
    if bx1 <= bx0 or by1 <= by0:
        raise PromptError(f"{path}.rotation", "the rotated rectangle lies outside the image")
    return Box(x0=bx0, y0=by0, x1=bx1, y1=by1)


def _polygon(value: Mapping[str, Any], path: str, width: int, height: int) -> Polygon:
    points = value.get("points")
    if not isinstance(points, list) or len(points) < 3:
        raise PromptError(f"{path}.points", "a polygon needs a list of at least 3 [x, y] points")
    out = []
    for i, point in enumerate(points):
        if not isinstance(point, list | tuple) or len(point) != 2:
            raise PromptError(f"{path}.points[{i}]", "must be an [x, y] pair in percent")
        px = percent_to_px(_percent(point[0], f"{path}.points[{i}][0]"), width)
        py = percent_to_px(_percent(point[1], f"{path}.points[{i}][1]"), height)
        out.append((px, py))
    return Polygon(points=out)


def _mask(value: Mapping[str, Any], path: str, width: int, height: int) -> MaskPrompt:
    return MaskPrompt(rle=brush_value_to_mask(value, path, width, height).to_coco_rle())


def brush_value_to_mask(value: Mapping[str, Any], path: str, width: int, height: int) -> Mask:
    fmt = value.get("format", "rle")
    if fmt != "rle":
        raise PromptError(f"{path}.format", f'brush format {fmt!r} is not supported (only "rle")')
    rle = value.get("rle")
    if not isinstance(rle, list) or not rle:
        raise PromptError(f"{path}.rle", "a brush region needs its 'rle' list of integers")
    try:
        return Mask.from_ls_brush_rle(rle, height, width)
    except MaskError as exc:
        raise PromptError(f"{path}.rle", str(exc)) from None


# --- seemly masks -> Label Studio results -------------------------------------------------------


def region_id() -> str:
    """A Label Studio-style short region id."""
    return secrets.token_urlsafe(7)[:10]


def brush_result(mask: Mask, label: str | None, tag: ControlTag, score: float) -> dict[str, Any]:
    """A ``brushlabels`` result whose ``rle`` decodes (in Label Studio) to exactly ``mask``."""
    return {
        "id": region_id(),
        "from_name": tag.name,
        "to_name": tag.to_name,
        "type": "brushlabels",
        "original_width": mask.width,
        "original_height": mask.height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask.to_ls_brush_rle(), "brushlabels": [label] if label else []},
        "score": float(score),
        "readonly": False,
    }


def polygon_results(mask: Mask, label: str | None, tag: ControlTag, score: float) -> list[dict[str, Any]]:
    """``polygonlabels`` results, one per outer ring (Label Studio polygons cannot hold holes)."""
    out = []
    for ring in mask.to_polygons():
        if signed_area(ring) <= 0:  # a hole
            continue
        points = [[px_to_percent(x, mask.width), px_to_percent(y, mask.height)] for x, y in ring]
        out.append(
            {
                "id": region_id(),
                "from_name": tag.name,
                "to_name": tag.to_name,
                "type": "polygonlabels",
                "original_width": mask.width,
                "original_height": mask.height,
                "image_rotation": 0,
                "value": {"points": points, "closed": True, "polygonlabels": [label] if label else []},
                "score": float(score),
                "readonly": False,
            }
        )
    return out


def mask_results(mask: Mask, label: str | None, config: ParsedConfig, score: float) -> list[dict[str, Any]]:
    """Everything the config asks for: brush RLE if it has ``<BrushLabels>``, polygons if ``<PolygonLabels>``."""
    if mask.is_empty:
        return []
    out: list[dict[str, Any]] = []
    if config.brush is not None:
        out.append(brush_result(mask, label, config.brush, score))
    if config.polygon is not None:
        out += polygon_results(mask, label, config.polygon, score)
    return out


def prediction(
    segments: Sequence[Segment], config: ParsedConfig, model_version: str, label: str | None = None
) -> dict[str, Any]:
    """One Label Studio prediction: the results of ``segments`` and their mean score (always set)."""
    results: list[dict[str, Any]] = []
    scores = []
    for segment in segments:
        name = label if label is not None else segment.label
        if name is not None and name not in config.labels:
            name = None
        produced = mask_results(segment.mask, name, config, segment.score)
        if produced:
            results += produced
            scores.append(float(segment.score))
    return {
        "result": results,
        "score": float(sum(scores) / len(scores)) if scores else 0.0,
        "model_version": model_version,
    }


# --- submitted annotations -> masks ---------------------------------------------------------------


@dataclass(frozen=True)
class SubmittedRegion:
    """One region of a submitted annotation, as a mask."""

    region_id: str
    label: str
    mask: Mask


def annotation_regions(
    results: Any, config: ParsedConfig, path: str = "annotation.result"
) -> list[SubmittedRegion]:
    """The ``brushlabels`` and ``polygonlabels`` regions of an annotation on the config's image.

    Other results (the prompt key points and boxes, text) are not masks and are skipped. Several
    results with the same region id (Label Studio splits a region's labels) are merged.
    """
    if not isinstance(results, list):
        raise PromptError(path, f"must be a list of results, got {_json_type(results)}")
    merged: dict[str, SubmittedRegion] = {}
    for index, raw in enumerate(results):
        item_path = f"{path}[{index}]"
        item = _mapping(raw, item_path)
        kind = str(item.get("type", "")).lower()
        outputs = {tag.name for tag in (config.brush, config.polygon) if tag is not None}
        if kind not in ("brushlabels", "polygonlabels") or item.get("from_name") not in outputs:
            continue  # prompt regions (key points, boxes, text) the annotator left in the annotation
        value = _mapping(item.get("value"), f"{item_path}.value")
        ow, oh = item.get("original_width"), item.get("original_height")
        if (
            isinstance(ow, bool)
            or isinstance(oh, bool)
            or not isinstance(ow, int | float)
            or not isinstance(oh, int | float)
            or ow < 1
            or oh < 1
        ):
            raise PromptError(
                f"{item_path}.original_width", "a mask region needs original_width and original_height"
            )
        width, height = round(ow), round(oh)
        if kind == "brushlabels":
            mask = brush_value_to_mask(value, f"{item_path}.value", width, height)
        else:
            points = value.get("points")
            try:
                mask = Mask.from_ls_polygons_percent([points], height, width)
            except MaskError as exc:
                raise PromptError(f"{item_path}.value.points", str(exc)) from None
        labels = value.get(kind) or []
        label = str(labels[0]) if isinstance(labels, list) and labels else ""
        rid = str(item.get("id") or f"r{index}")[:64]
        if rid in merged:
            previous = merged[rid]
            mask = Mask(previous.mask.data | mask.data) if previous.mask.shape == mask.shape else mask
            label = previous.label or label
        merged[rid] = SubmittedRegion(region_id=rid, label=label[:200], mask=mask)
    return list(merged.values())

"""Prompt types: what an annotator tells the engine, one round at a time.

Coordinates are continuous pixel coordinates: pixel ``(row r, column c)`` covers
``[c, c+1) x [r, r+1)``, so a click at ``(x, y)`` lands on pixel ``(int(y), int(x))`` and a
Label Studio percentage ``p`` of an image ``W`` wide is exactly ``p * W / 100``. Points may lie on
the far edges (``x == W`` is 100 %, which Label Studio sends); engines clamp such a click into the
last pixel.

A :class:`PromptRound` is one request (any mix of visual prompts and text); a :class:`Session`
keeps the ordered rounds on one image with their resulting masks, which engines receive as memory.
Every error names the offending field (``prompts[2].x``) so that the Label Studio backend can
answer with a useful 4xx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seemly.masks import Mask, MaskError

Coordinate = Annotated[float, Field(strict=True)]  # a number: JSON true/"12" are client bugs, not 1.0/12.0
Point = tuple[Coordinate, Coordinate]
Placed = tuple[str, str, float, float]  # (x field path, y field path, x, y) relative to the prompt

MAX_TEXT_CHARS = 200
MAX_POINTS = 20_000


class PromptError(ValueError):
    """An invalid prompt; ``field`` is the path of the bad value (``prompts[0].x``)."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}" if field_path else message)


class _Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def coordinates(self) -> list[Placed]:
        """Every point that must lie inside the image, with the field paths that name its x and y."""
        return []


class Click(_Prompt):
    """A positive (object) or negative (background) click."""

    kind: Literal["click"] = "click"
    x: Coordinate
    y: Coordinate
    positive: bool = True

    def coordinates(self) -> list[Placed]:
        return [("x", "y", self.x, self.y)]


class Box(_Prompt):
    """An axis-aligned box around the object: ``(x0, y0)`` top-left, ``(x1, y1)`` bottom-right."""

    kind: Literal["box"] = "box"
    x0: Coordinate
    y0: Coordinate
    x1: Coordinate
    y1: Coordinate

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if self.x1 <= self.x0:
            raise ValueError(f"x1 ({self.x1:g}) must be greater than x0 ({self.x0:g})")
        if self.y1 <= self.y0:
            raise ValueError(f"y1 ({self.y1:g}) must be greater than y0 ({self.y0:g})")
        return self

    def coordinates(self) -> list[Placed]:
        return [("x0", "y0", self.x0, self.y0), ("x1", "y1", self.x1, self.y1)]


class Scribble(_Prompt):
    """A freehand polyline stroke, positive (object) or negative (background)."""

    kind: Literal["scribble"] = "scribble"
    points_xy: list[Point] = Field(alias="points", min_length=1, max_length=MAX_POINTS)
    positive: bool = True
    width: float = Field(default=3.0, gt=0, le=256, description="Stroke width in pixels.")

    model_config = ConfigDict(populate_by_name=True)

    def coordinates(self) -> list[Placed]:
        return [(f"points[{i}][0]", f"points[{i}][1]", x, y) for i, (x, y) in enumerate(self.points_xy)]


class Polygon(_Prompt):
    """A closed polygon: the region it encloses is object (or background when negative)."""

    kind: Literal["polygon"] = "polygon"
    points_xy: list[Point] = Field(alias="points", min_length=3, max_length=MAX_POINTS)
    positive: bool = True

    model_config = ConfigDict(populate_by_name=True)

    def coordinates(self) -> list[Placed]:
        return [(f"points[{i}][0]", f"points[{i}][1]", x, y) for i, (x, y) in enumerate(self.points_xy)]


class MaskPrompt(_Prompt):
    """A coarse mask (COCO RLE) to refine, e.g. a brush stroke region or an earlier result."""

    kind: Literal["mask"] = "mask"
    rle: dict[str, Any]
    positive: bool = True

    @field_validator("rle")
    @classmethod
    def _decodable(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            Mask.from_coco_rle(value)
        except MaskError as exc:
            raise ValueError(str(exc)) from exc
        return value

    def mask(self) -> Mask:
        return Mask.from_coco_rle(self.rle)


class Text(_Prompt):
    """Free text naming what to segment ("cat", "the red car")."""

    kind: Literal["text"] = "text"
    text: str

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("text prompt is empty")
        if len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"text prompt is longer than {MAX_TEXT_CHARS} characters")
        return value


class Reference(_Prompt):
    """An example: another image (by URI) and the mask of the thing to find in this one."""

    kind: Literal["reference"] = "reference"
    image_uri: str = Field(min_length=1, max_length=4096)
    rle: dict[str, Any]

    @field_validator("rle")
    @classmethod
    def _non_empty_mask(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            mask = Mask.from_coco_rle(value)
        except MaskError as exc:
            raise ValueError(str(exc)) from exc
        if mask.is_empty:
            raise ValueError("the reference mask is empty: mark the example object in the reference image")
        return value

    def mask(self) -> Mask:
        return Mask.from_coco_rle(self.rle)


Prompt = Annotated[
    Click | Box | Scribble | Polygon | MaskPrompt | Text | Reference, Field(discriminator="kind")
]
VISUAL_KINDS = ("click", "box", "scribble", "polygon", "mask")


class PromptRound(BaseModel):
    """One annotator request: a set of prompts that apply together (text and visual may mix)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[Prompt] = Field(min_length=1, max_length=1000)
    label: str | None = Field(default=None, max_length=200, description="Label the result will carry.")

    def of_kind(self, *kinds: str) -> list[Any]:
        return [p for p in self.prompts if p.kind in kinds]

    @property
    def clicks(self) -> list[Click]:
        return self.of_kind("click")

    @property
    def boxes(self) -> list[Box]:
        return self.of_kind("box")

    @property
    def texts(self) -> list[Text]:
        return self.of_kind("text")

    @property
    def references(self) -> list[Reference]:
        return self.of_kind("reference")

    @property
    def visual(self) -> list[Any]:
        return self.of_kind(*VISUAL_KINDS)

    def check_bounds(self, width: int, height: int) -> PromptRound:
        """Raise :class:`PromptError` naming the first prompt that does not fit a ``width x height`` image."""
        for index, prompt in enumerate(self.prompts):
            for x_field, y_field, x, y in prompt.coordinates():
                for field_name, name, value, size in ((x_field, "x", x, width), (y_field, "y", y, height)):
                    path = f"prompts[{index}].{field_name}"
                    if not math.isfinite(value):
                        raise PromptError(path, f"{name} must be a finite number")
                    if not 0 <= value <= size:
                        raise PromptError(
                            path, f"{name}={value:g} is outside the image: 0 <= {name} <= {size}"
                        )
            if isinstance(prompt, MaskPrompt):
                mask_height, mask_width = (int(v) for v in prompt.rle["size"])
                if (mask_height, mask_width) != (height, width):
                    raise PromptError(
                        f"prompts[{index}].rle",
                        f"mask is {mask_width}x{mask_height} but the image is {width}x{height}",
                    )
        return self


_KINDS = frozenset({"click", "box", "scribble", "polygon", "mask", "text", "reference"})


def _error_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif position == 2 and loc[0] == "prompts" and part in _KINDS:
            # pydantic puts the discriminator tag after the prompt's index; users never wrote it.
            # (Only there: ``text`` is also the name of the Text prompt's field.)
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_round(data: Any, width: int | None = None, height: int | None = None) -> PromptRound:
    """Validate raw input into a round; every failure is a :class:`PromptError` naming the field."""
    try:
        prompt_round = PromptRound.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise PromptError(_error_path(tuple(first["loc"])), message) from None
    if width is not None and height is not None:
        prompt_round.check_bounds(width, height)
    return prompt_round


@dataclass(frozen=True)
class RoundResult:
    """One remembered round: what was asked and what the engine answered."""

    round: PromptRound
    mask: Mask
    score: float = 1.0


@dataclass
class Session:
    """The ordered rounds on one image; ``memory`` is what engines receive."""

    image_sha256: str
    width: int
    height: int
    rounds: list[RoundResult] = field(default_factory=list)

    def add(self, prompt_round: PromptRound, mask: Mask, score: float = 1.0) -> RoundResult:
        if mask.shape != (self.height, self.width):
            raise MaskError(
                f"mask shape {mask.shape} does not match the session image {self.height}x{self.width}"
            )
        result = RoundResult(prompt_round, mask, score)
        self.rounds.append(result)
        return result

    @property
    def memory(self) -> tuple[RoundResult, ...]:
        return tuple(self.rounds)

    @property
    def last_mask(self) -> Mask | None:
        return self.rounds[-1].mask if self.rounds else None

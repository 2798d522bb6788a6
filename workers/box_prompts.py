"""``--box-prompts FILE``: boxes to segment, one JSON object per line, validated before a job starts.

Each line names one image and the boxes to segment in it (pixel coordinates of the upright image,
``[x0, y0, x1, y1]`` with ``x0 < x1`` and ``y0 < y1``) and, optionally, the label the masks carry::

    {"uri": "s3://photos/cats/001.jpg", "boxes": [[10, 20, 200, 180]], "label": "cat"}
    {"key": "cats/002.jpg", "boxes": [[0, 0, 64, 64], [70, 5, 120, 60]]}

``key`` is relative to the job's location: an S3 key in the job's bucket (``s3://bucket/<key>``) or,
for ``file://`` jobs, a path relative to the job's directory. The same image may appear on several
lines; its boxes are concatenated. Every image must lie under the job's prefix.

A bad file is refused as a whole, before any work starts, with every problem listed by line number
(a job that silently dropped half the boxes would be worse than no job).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seemly.prompts import Box
from seemly.storage import FileLocation, S3Location, StorageError, parse_uri, path_to_uri

MAX_BOXES_PER_IMAGE = 1000
MAX_ERRORS_SHOWN = 20

BoxList = Annotated[list[float], Field(min_length=4, max_length=4)]


class BoxPromptsError(ValueError):
    """The box-prompts file cannot be used; the message lists every problem found."""


class BoxPromptLine(BaseModel):
    """One line of the file."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(default=None, min_length=1, max_length=2048)
    key: str | None = Field(default=None, min_length=1, max_length=1024)
    boxes: list[BoxList] = Field(min_length=1, max_length=MAX_BOXES_PER_IMAGE)
    label: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _one_name(self) -> BoxPromptLine:
        if (self.uri is None) == (self.key is None):
            raise ValueError('give exactly one of "uri" or "key"')
        for index, (x0, y0, x1, y1) in enumerate(self.boxes):
            try:
                Box(x0=x0, y0=y0, x1=x1, y1=y1)
            except ValidationError as exc:
                reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ValueError(f"boxes[{index}] {[x0, y0, x1, y1]}: {reasons}") from None
        return self


@dataclass(frozen=True)
class BoxPrompt:
    """One box of one image, ready for the engine."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str

    def to_box(self) -> Box:
        return Box(x0=self.x0, y0=self.y0, x1=self.x1, y1=self.y1)


def _resolve(line: BoxPromptLine, prefix_uri: str) -> str:
    if line.uri is not None:
        return line.uri
    assert line.key is not None
    location = parse_uri(prefix_uri)
    if isinstance(location, S3Location):
        return f"s3://{location.bucket}/{line.key.lstrip('/')}"
    if isinstance(location, FileLocation):
        key = PurePosixPath(line.key)
        if key.is_absolute():
            return path_to_uri(str(key))
        base = Path(location.path)
        base = base if prefix_uri.endswith("/") or base.is_dir() else base.parent
        return path_to_uri(base / key)
    raise BoxPromptsError(f"{prefix_uri}: box prompts need an s3:// or file:// job location")


def parse_box_prompts(
    lines: Iterable[str], prefix_uri: str, source: str = "box prompts"
) -> dict[str, list[BoxPrompt]]:
    """Validate the JSON lines; returns ``{image uri: [boxes]}`` in file order, or raises with all errors."""
    try:
        parse_uri(prefix_uri)
    except StorageError as exc:
        raise BoxPromptsError(f"{source}: {exc}") from None
    prompts: dict[str, list[BoxPrompt]] = {}
    errors: list[str] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            line = BoxPromptLine.model_validate(json.loads(text))
            uri = _resolve(line, prefix_uri)
            parse_uri(uri)
            if not uri.startswith(prefix_uri):
                raise ValueError(f"{uri} is not under the job's location {prefix_uri}")
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(p) for p in error["loc"]) or "line"
                errors.append(f"line {number}: {where}: {error['msg'].removeprefix('Value error, ')}")
            continue
        except (ValueError, StorageError) as exc:
            errors.append(f"line {number}: {exc}")
            continue
        boxes = prompts.setdefault(uri, [])
        boxes.extend(BoxPrompt(*map(float, box), label=line.label) for box in line.boxes)
        if len(boxes) > MAX_BOXES_PER_IMAGE:
            errors.append(f"line {number}: {uri} has more than {MAX_BOXES_PER_IMAGE} boxes in total")
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise BoxPromptsError(f"{source}: {len(errors)} problem(s):\n  " + "\n  ".join(shown) + more)
    if not prompts:
        raise BoxPromptsError(f"{source}: no box prompts in the file")
    return prompts


def load_box_prompts(path: str | Path, prefix_uri: str) -> dict[str, list[BoxPrompt]]:
    """Read and validate a box-prompts file (see the module docstring)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return parse_box_prompts(handle, prefix_uri, source=str(path))
    except OSError as exc:
        raise BoxPromptsError(f"{path}: cannot read the box-prompts file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise BoxPromptsError(f"{path}: not UTF-8 text (expected JSON lines)") from None


def encode_boxes(boxes: list[BoxPrompt]) -> str:
    """The compact form that travels with an item through the pipeline."""
    return json.dumps([[b.x0, b.y0, b.x1, b.y1, b.label] for b in boxes], separators=(",", ":"))


def decode_boxes(text: str) -> list[BoxPrompt]:
    return [
        BoxPrompt(float(x0), float(y0), float(x1), float(y1), str(label))
        for x0, y0, x1, y1, label in json.loads(text)
    ]

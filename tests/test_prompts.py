"""Prompt rounds: every kind parses, every mistake is a PromptError that names the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from seemly.masks import Mask, MaskError
from seemly.prompts import (
    Box,
    Click,
    MaskPrompt,
    Polygon,
    PromptError,
    PromptRound,
    Reference,
    Scribble,
    Session,
    Text,
    parse_round,
)

WIDTH, HEIGHT = 40, 30


def rle(height: int = HEIGHT, width: int = WIDTH, *, empty: bool = False) -> dict[str, Any]:
    array = np.zeros((height, width), bool)
    if not empty:
        array[2:5, 3:9] = True
    return Mask(array).to_coco_rle()


def one(prompt: dict[str, Any], width: int | None = WIDTH, height: int | None = HEIGHT) -> PromptRound:
    return parse_round({"prompts": [prompt]}, width, height)


def error_of(data: Any, width: int | None = WIDTH, height: int | None = HEIGHT) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse_round(data, width, height)
    return caught.value


# --- valid rounds ----------------------------------------------------------------------------------
def test_every_kind_parses_with_its_defaults() -> None:
    data = {
        "prompts": [
            {"kind": "click", "x": 3.5, "y": 4.5},
            {"kind": "click", "x": 0, "y": 0, "positive": False},
            {"kind": "box", "x0": 1, "y0": 2, "x1": 40, "y1": 30},
            {"kind": "scribble", "points": [[1, 1], [5.5, 2.25]]},
            {"kind": "polygon", "points": [[1, 1], [10, 1], [10, 10]], "positive": False},
            {"kind": "mask", "rle": rle()},
            {"kind": "text", "text": "  the   red\tcar "},
            {"kind": "reference", "image_uri": "s3://bucket/ref.png", "rle": rle(7, 9)},
        ],
        "label": "car",
    }
    prompt_round = parse_round(data, WIDTH, HEIGHT)
    click, negative, box, scribble, polygon, mask, text, reference = prompt_round.prompts
    assert click == Click(x=3.5, y=4.5) and click.positive
    assert not negative.positive
    assert box == Box(x0=1, y0=2, x1=40, y1=30)
    assert isinstance(scribble, Scribble) and scribble.points_xy == [(1.0, 1.0), (5.5, 2.25)]
    assert scribble.width == 3.0 and scribble.positive
    assert isinstance(polygon, Polygon) and not polygon.positive
    assert isinstance(mask, MaskPrompt) and mask.mask().area == 18
    assert isinstance(text, Text) and text.text == "the red car"  # whitespace normalised
    assert isinstance(reference, Reference) and reference.mask().shape == (7, 9)  # any image size
    assert prompt_round.label == "car"
    assert prompt_round.clicks == [click, negative]
    assert prompt_round.boxes == [box]
    assert prompt_round.texts == [text]
    assert prompt_round.references == [reference]
    assert prompt_round.visual == [click, negative, box, scribble, polygon, mask]


def test_text_and_box_combine_in_one_round() -> None:
    prompt_round = parse_round(
        {"prompts": [{"kind": "text", "text": "dog"}, {"kind": "box", "x0": 0, "y0": 0, "x1": 10, "y1": 10}]},
        WIDTH,
        HEIGHT,
    )
    assert [p.kind for p in prompt_round.prompts] == ["text", "box"]
    assert prompt_round.texts[0].text == "dog" and prompt_round.boxes[0].x1 == 10


def test_round_survives_a_json_round_trip() -> None:
    prompt_round = parse_round(
        {
            "prompts": [
                {"kind": "scribble", "points": [[1, 2], [3, 4]], "positive": False, "width": 5},
                {"kind": "polygon", "points": [[1, 1], [5, 1], [5, 5]]},
                {"kind": "click", "x": 2, "y": 3},
            ]
        }
    )
    dumped = prompt_round.model_dump(mode="json", by_alias=True)
    assert parse_round(dumped) == prompt_round
    assert PromptRound.model_validate_json(prompt_round.model_dump_json(by_alias=True)) == prompt_round


def test_points_may_lie_on_the_far_edges() -> None:
    """100 % in Label Studio is x == width: on the image's edge, still inside."""
    one({"kind": "box", "x0": 0, "y0": 0, "x1": WIDTH, "y1": HEIGHT})
    one({"kind": "polygon", "points": [[0, 0], [WIDTH, 0], [WIDTH, HEIGHT]]})
    one({"kind": "click", "x": WIDTH, "y": HEIGHT})
    error = error_of({"prompts": [{"kind": "click", "x": WIDTH + 0.001, "y": 1}]})
    assert (error.field, error.message) == ("prompts[0].x", "x=40.001 is outside the image: 0 <= x <= 40")


def test_without_a_size_bounds_are_not_checked() -> None:
    assert parse_round({"prompts": [{"kind": "click", "x": 1e6, "y": 1e6}]}).clicks[0].x == 1e6


@settings(max_examples=100, deadline=None)
@given(st.floats(-50, 100), st.floats(-50, 100))
def test_click_is_accepted_iff_inside_the_image(x: float, y: float) -> None:
    inside = 0 <= x <= WIDTH and 0 <= y <= HEIGHT
    try:
        one({"kind": "click", "x": x, "y": y})
    except PromptError as error:
        assert not inside
        assert error.field == ("prompts[0].x" if not 0 <= x <= WIDTH else "prompts[0].y")
    else:
        assert inside


# --- out of the image: the error names the field ---------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "field", "message"),
    [
        ({"kind": "click", "x": 5, "y": -1}, "prompts[1].y", "y=-1 is outside the image: 0 <= y <= 30"),
        ({"kind": "box", "x0": 1, "y0": 1, "x1": 41, "y1": 5}, "prompts[1].x1", "x=41 is outside"),
        ({"kind": "box", "x0": -2, "y0": 1, "x1": 4, "y1": 5}, "prompts[1].x0", "x=-2 is outside"),
        ({"kind": "box", "x0": 1, "y0": 1, "x1": 4, "y1": 31}, "prompts[1].y1", "y=31 is outside"),
        ({"kind": "scribble", "points": [[1, 1], [2, 2], [3, 99]]}, "prompts[1].points[2][1]", "y=99"),
        ({"kind": "polygon", "points": [[1, 1], [-0.5, 2], [3, 3]]}, "prompts[1].points[1][0]", "x=-0.5"),
    ],
)
def test_out_of_image_names_the_field(prompt: dict[str, Any], field: str, message: str) -> None:
    error = error_of({"prompts": [{"kind": "text", "text": "cat"}, prompt]})
    assert error.field == field
    assert message in error.message
    assert str(error) == f"{field}: {error.message}"


def test_mask_of_the_wrong_size() -> None:
    error = error_of({"prompts": [{"kind": "mask", "rle": rle(HEIGHT, WIDTH - 1)}]})
    assert (error.field, error.message) == ("prompts[0].rle", "mask is 39x30 but the image is 40x30")


# --- invalid values --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompts", "field", "message"),
    [
        ([{"kind": "click", "x": float("nan"), "y": 1}], "prompts[0].x", "finite number"),
        ([{"kind": "click", "x": 1, "y": float("inf")}], "prompts[0].y", "finite number"),
        ([{"kind": "box", "x0": float("-inf"), "y0": 0, "x1": 1, "y1": 1}], "prompts[0].x0", "finite number"),
        ([{"kind": "scribble", "points": [[1, float("nan")]]}], "prompts[0].points[0][1]", "finite number"),
        ([{"kind": "click", "x": True, "y": 1}], "prompts[0].x", "valid number"),
        ([{"kind": "click", "x": "12", "y": 1}], "prompts[0].x", "valid number"),
        ([{"kind": "click", "y": 1}], "prompts[0].x", "Field required"),
        (
            [{"kind": "box", "x0": 5, "y0": 0, "x1": 1, "y1": 1}],
            "prompts[0]",
            "x1 (1) must be greater than x0 (5)",
        ),
        (
            [{"kind": "box", "x0": 0, "y0": 3, "x1": 1, "y1": 3}],
            "prompts[0]",
            "y1 (3) must be greater than y0 (3)",
        ),
        ([{"kind": "polygon", "points": [[1, 1], [2, 2]]}], "prompts[0].points", "at least 3 items"),
        ([{"kind": "scribble", "points": []}], "prompts[0].points", "at least 1 item"),
        ([{"kind": "scribble", "points": [[1, 2, 3]]}], "prompts[0].points[0]", "at most 2 items"),
        ([{"kind": "scribble", "points": [[1, 1]], "width": 0}], "prompts[0].width", "greater than 0"),
        ([{"kind": "text", "text": ""}], "prompts[0].text", "text prompt is empty"),
        ([{"kind": "text", "text": " \n\t "}], "prompts[0].text", "text prompt is empty"),
        ([{"kind": "text", "text": "x" * 201}], "prompts[0].text", "longer than 200 characters"),
        (
            [{"kind": "reference", "image_uri": "s3://b/r.png", "rle": rle(empty=True)}],
            "prompts[0].rle",
            "empty",
        ),
        (
            [{"kind": "reference", "image_uri": "", "rle": rle()}],
            "prompts[0].image_uri",
            "at least 1 character",
        ),
        ([{"kind": "mask", "rle": {"size": [2, 2], "counts": [1, 2]}}], "prompts[0].rle", "sum to height"),
        ([{"kind": "mask", "rle": {"counts": "x"}}], "prompts[0].rle", "needs 'size'"),
        ([{"kind": "lasso", "x": 1}], "prompts[0]", "'lasso' found using 'kind' does not match"),
        ([{"x": 1, "y": 1}], "prompts[0]", "Unable to extract tag using discriminator 'kind'"),
        ([{"kind": "click", "x": 1, "y": 1, "z": 2}], "prompts[0].z", "Extra inputs are not permitted"),
        ([{"kind": "text", "text": "cat", "positive": True}], "prompts[0].positive", "Extra inputs"),
        (["click"], "prompts[0]", "dictionary"),
        ([], "prompts", "at least 1 item"),
    ],
)
def test_invalid_prompts_name_the_field(prompts: list[Any], field: str, message: str) -> None:
    error = error_of({"prompts": prompts})
    assert error.field == field
    assert message in error.message


def test_round_level_errors() -> None:
    assert error_of({}).field == "prompts"
    assert error_of({"prompts": [{"kind": "text", "text": "a"}], "labels": "x"}).field == "labels"
    assert error_of({"prompts": [{"kind": "text", "text": "a"}], "label": "x" * 201}).field == "label"
    not_a_dict = error_of([{"kind": "text", "text": "a"}])
    assert not_a_dict.field == "" and str(not_a_dict) == not_a_dict.message


def test_prompts_are_frozen() -> None:
    click = Click(x=1, y=2)
    with pytest.raises(ValidationError):
        click.x = 5  # type: ignore[misc]


# --- sessions --------------------------------------------------------------------------------------
def test_session_keeps_rounds_as_memory() -> None:
    session = Session(image_sha256="ab" * 32, width=WIDTH, height=HEIGHT)
    assert session.memory == () and session.last_mask is None
    first_round = one({"kind": "click", "x": 3, "y": 3})
    second_round = one({"kind": "click", "x": 8, "y": 3, "positive": False})
    first_mask, second_mask = Mask.full(HEIGHT, WIDTH), Mask.empty(HEIGHT, WIDTH)
    session.add(first_round, first_mask, score=0.5)
    result = session.add(second_round, second_mask)
    assert result.round == second_round and result.score == 1.0
    assert [r.round for r in session.memory] == [first_round, second_round]
    assert [r.score for r in session.memory] == [0.5, 1.0]
    assert session.last_mask == second_mask
    assert isinstance(session.memory, tuple)  # engines cannot append to the history


def test_session_rejects_a_mask_of_another_size() -> None:
    session = Session(image_sha256="00" * 32, width=WIDTH, height=HEIGHT)
    with pytest.raises(MaskError, match="does not match the session image"):
        session.add(one({"kind": "text", "text": "x"}), Mask.empty(WIDTH, HEIGHT))
    assert session.memory == ()

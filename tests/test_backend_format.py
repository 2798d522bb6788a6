"""Label Studio JSON ⇄ seemly types (backend/ls_format.py): conversions checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from backend import ls_format
from plugin.labeling_config import parse_labeling_config
from seemly.engines.base import Segment
from seemly.masks import Mask
from seemly.prompts import Box, Click, MaskPrompt, Polygon, PromptError
from tests.backend_support import BRUSH_CONFIG, POLYGON_CONFIG, make_scene

CFG = parse_labeling_config(BRUSH_CONFIG)
POLY = parse_labeling_config(POLYGON_CONFIG)
W, H = 160, 120


def kp(x, y, positive=True, label="cat", **extra):
    return {
        "from_name": "point" if positive else "point_negative",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        **extra,
    }


def rect(x, y, w, h, rotation=0, label="cat"):
    return {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


def test_percent_to_pixel_is_exact_by_hand() -> None:
    # 31.25 % of 160 px = 50 px; 50 % of 120 px = 60 px; 0 and 100 % are the image edges.
    parsed = ls_format.parse_context({"result": [kp(31.25, 50.0)]}, CFG, W, H)
    assert parsed.visual == [Click(x=50.0, y=60.0, positive=True)]
    assert ls_format.percent_to_px(12.5, 160) == 20.0
    assert ls_format.percent_to_px(100.0, 120) == 120.0
    assert ls_format.percent_to_px(0.0, 120) == 0.0
    # not rounded to the pixel grid: 1/3 % of 300 px is exactly 1 px, 0.1 % of 160 is 0.16 px
    assert ls_format.percent_to_px(100 / 3, 300) == pytest.approx(100.0, abs=1e-12)
    assert ls_format.percent_to_px(0.1, 160) == pytest.approx(0.16, abs=1e-12)


def test_rectangle_to_box_in_pixels() -> None:
    # x 25 % of 160 = 40, y 10 % of 120 = 12, width 50 % = 80 px, height 25 % = 30 px
    parsed = ls_format.parse_context({"result": [rect(25, 10, 50, 25)]}, CFG, W, H)
    assert parsed.visual == [Box(x0=40.0, y0=12.0, x1=120.0, y1=42.0)]
    assert parsed.region_prompt is True
    assert parsed.label == "cat"


def test_rotated_rectangle_becomes_its_bounding_box() -> None:
    # 90° clockwise about the top-left corner (x=50 %, y=10 %): a 20 % x 25 % box (32 x 30 px)
    # now spans x in [80-30, 80] and y in [12, 12+32].
    parsed = ls_format.parse_context({"result": [rect(50, 10, 20, 25, rotation=90)]}, CFG, W, H)
    box = parsed.visual[0]
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((50.0, 12.0, 80.0, 44.0))


def test_negative_points_from_tag_and_from_alt_click() -> None:
    results = [kp(10, 10, positive=False), kp(20, 20, is_positive=False), kp(30, 30, is_positive=True)]
    parsed = ls_format.parse_context({"result": results}, CFG, W, H)
    assert [c.positive for c in parsed.visual] == [False, False, True]
    assert parsed.label == "cat"


def test_textarea_is_a_text_prompt_and_blank_clears_it() -> None:
    text = {
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["  red   cat "]},
    }
    parsed = ls_format.parse_context({"result": [text]}, CFG, W, H)
    assert parsed.text == "red cat" and parsed.visual == []
    # Label Studio lists every line submitted so far: the last one is the prompt
    text["value"] = {"text": ["cat", "dog", ""]}
    assert ls_format.parse_context({"result": [text]}, CFG, W, H).text == "dog"
    text["value"] = {"text": [""]}
    assert ls_format.parse_context({"result": [text]}, CFG, W, H).text == ""


def test_region_ids_and_groups() -> None:
    results = [kp(10, 10, id="a"), kp(20, 20, positive=False, id="b"), rect(5, 5, 10, 10, label="dog")]
    items = ls_format.parse_context({"result": results}, CFG, W, H).items
    assert [i.region_id for i in items] == ["a", "b", None]
    assert [i.group for i in items] == [("keypointlabels", "cat")] * 2 + [("rectanglelabels", "dog")]
    assert [i.is_region for i in items] == [False, False, True]


def test_brush_and_polygon_regions_become_mask_and_polygon_prompts() -> None:
    truth = np.zeros((H, W), bool)
    truth[10:30, 20:60] = True
    brush = {
        "from_name": "mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": Mask(truth).to_ls_brush_rle(), "brushlabels": ["dog"]},
    }
    parsed = ls_format.parse_context({"result": [brush]}, CFG, W, H)
    assert isinstance(parsed.visual[0], MaskPrompt)
    assert parsed.visual[0].mask() == Mask(truth)
    polygon = {
        "from_name": "polygon",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": W,
        "original_height": H,
        "value": {"points": [[10, 10], [50, 10], [50, 50]], "polygonlabels": ["dog"]},
    }
    parsed = ls_format.parse_context({"result": [polygon]}, POLY, W, H)
    assert parsed.visual == [Polygon(points=[(16.0, 12.0), (80.0, 12.0), (80.0, 60.0)])]
    assert parsed.label == "dog"


@pytest.mark.parametrize(
    ("result", "field", "words"),
    [
        (kp(100.5, 10), "value.x", "over 100 %"),
        (kp(10, -3), "value.y", "negative"),
        (kp("10", 10), "value.x", "must be a number"),
        (kp(float("nan"), 10), "value.x", "finite"),
        (rect(60, 10, 50, 10), "value.width", "over 100 %"),
        (rect(10, 10, 0, 10), "value.width", "no area"),
        (kp(10, 10, label="zebra"), "value.keypointlabels", "unknown label 'zebra'"),
        ({**kp(10, 10), "from_name": "nope"}, "from_name", "not a tag seemly reads prompts from"),
        ({**kp(10, 10), "type": "rectanglelabels"}, "type", "does not match"),
        (
            {**kp(10, 10), "original_width": 999},
            "original_width",
            "999x120 image but the task's image is 160x120",
        ),
        ({**kp(10, 10), "value": None}, "value", "must be a JSON object"),
    ],
)
def test_bad_context_names_the_field(result, field, words) -> None:
    with pytest.raises(PromptError) as caught:
        ls_format.parse_context({"result": [result]}, CFG, W, H)
    assert caught.value.field == f"params.context.result[0].{field}"
    assert words in caught.value.message


def test_empty_or_missing_context_result() -> None:
    # an empty group is legitimate: the annotator deleted its last smart region
    assert ls_format.parse_context({"result": []}, CFG, W, H).empty
    for context in ({"result": "x"}, {}):
        with pytest.raises(PromptError) as caught:
            ls_format.parse_context(context, CFG, W, H)
        assert caught.value.field == "params.context.result"


def test_brush_result_decodes_back_to_the_mask() -> None:
    scene = make_scene(3)
    truth = scene.truth["cat"]
    result = ls_format.brush_result(truth, "cat", CFG.output, 0.875)
    assert result["type"] == "brushlabels" and result["from_name"] == "mask" and result["to_name"] == "image"
    assert (result["original_width"], result["original_height"]) == (scene.width, scene.height)
    assert result["value"]["brushlabels"] == ["cat"] and result["value"]["format"] == "rle"
    decoded = Mask.from_ls_brush_rle(result["value"]["rle"], scene.height, scene.width)
    assert decoded == truth
    # and with Label Studio's own decoder (label_studio_sdk.converter.brush), alpha channel
    from label_studio_sdk.converter import brush

    rgba = brush.decode_rle(result["value"]["rle"]).reshape(scene.height, scene.width, 4)
    assert np.array_equal(rgba[:, :, 3] > 0, truth.data)


def test_polygon_results_round_trip_in_percent() -> None:
    data = np.zeros((H, W), bool)
    data[12:60, 16:80] = True
    data[30:40, 30:40] = False  # a hole: Label Studio polygons cannot hold it
    data[90:100, 100:120] = True  # a second object
    results = ls_format.polygon_results(Mask(data), "dog", POLY.polygon, 0.5)
    assert len(results) == 2  # outer rings only
    first = results[0]
    assert first["type"] == "polygonlabels" and first["value"]["polygonlabels"] == ["dog"]
    filled = Mask.from_ls_polygons_percent([r["value"]["points"] for r in results], H, W)
    expected = data.copy()
    expected[30:40, 30:40] = True
    assert filled == Mask(expected)
    # the rectangle's corners in percent, exactly
    assert [10.0, 10.0] in first["value"]["points"] and [50.0, 50.0] in first["value"]["points"]


def test_prediction_respects_the_config_outputs() -> None:
    mask = Mask(np.pad(np.ones((10, 10), bool), ((5, H - 15), (5, W - 15))))
    segments = [Segment(mask, 0.75, "classic-1", "cat")]
    brush_only = ls_format.prediction(segments, CFG, "classic-1")
    assert [r["type"] for r in brush_only["result"]] == ["brushlabels"]
    assert brush_only["score"] == 0.75 and brush_only["model_version"] == "classic-1"
    poly_only = ls_format.prediction(segments, POLY, "classic-1")
    assert [r["type"] for r in poly_only["result"]] == ["polygonlabels"]
    unlabeled = ls_format.prediction([Segment(mask, 0.5, "v", None)], CFG, "v")
    assert unlabeled["result"][0]["value"]["brushlabels"] == []
    empty = ls_format.prediction([Segment(Mask.empty(H, W), 0.9, "v")], CFG, "v")
    assert empty == {"result": [], "score": 0.0, "model_version": "v"}


def test_project_id_forms() -> None:
    assert ls_format.ls_project_id("12.1700000000") == 12
    assert ls_format.ls_project_id(12) == 12
    assert ls_format.ls_project_id({"id": 5, "title": "x"}) == 5
    for bad in (None, "abc", True, -1, "0"):
        with pytest.raises(PromptError):
            ls_format.ls_project_id(bad)


def test_image_uri_and_missing_image() -> None:
    assert (
        ls_format.image_uri({"id": 1, "data": {"image": " /data/upload/1/a.png "}}, CFG)
        == "/data/upload/1/a.png"
    )
    with pytest.raises(PromptError, match="the task has no image") as caught:
        ls_format.image_uri({"id": 1, "data": {"text": "hi"}}, CFG)
    assert caught.value.field == "tasks[0].data.image"
    with pytest.raises(PromptError, match="must be a URL string"):
        ls_format.image_uri({"id": 1, "data": {"image": 5}}, CFG)


def test_annotator_from_drafts_or_explicit() -> None:
    task = {"id": 1, "data": {}, "drafts": [{"user": "ann@example.com"}]}
    assert ls_format.annotator_of({}, {}, task) == "ann@example.com"
    assert ls_format.annotator_of({}, {"user": 42}, task) == "42"
    assert ls_format.annotator_of({}, {}, {"id": 1}) == "anonymous"


def test_annotation_regions_decode_brush_and_polygons() -> None:
    data = np.zeros((H, W), bool)
    data[20:40, 20:50] = True
    results = [
        {
            "id": "a1",
            "from_name": "mask",
            "to_name": "image",
            "type": "brushlabels",
            "original_width": W,
            "original_height": H,
            "value": {"format": "rle", "rle": Mask(data).to_ls_brush_rle(), "brushlabels": ["cat"]},
        },
        {
            "id": "k",
            "from_name": "point",
            "to_name": "image",
            "type": "keypointlabels",
            "value": {"x": 1, "y": 1},
        },
    ]
    regions = ls_format.annotation_regions(results, CFG)
    assert [(r.region_id, r.label) for r in regions] == [("a1", "cat")]
    assert regions[0].mask == Mask(data)
    with pytest.raises(PromptError, match="original_width"):
        ls_format.annotation_regions([{**results[0], "original_width": None}], CFG)

"""Fuzzing the backend's boundary: malformed Label Studio payloads never cause a 500 or a hang.

Every endpoint Label Studio calls (``/predict``, ``/setup``, ``/webhook``, ``/train``) gets, through
the in-process Flask client on the real Postgres database:

* JSON junk of every shape (wrong types, NaN/Infinity, huge numbers, deep nesting, unicode);
* *near-valid* payloads: a real request with one field replaced by junk or removed (prompt
  coordinates out of range or NaN, unknown control tags and result types, wrong ids ...);
* bytes that are not JSON, and bodies over ``SEEMLY_MAX_REQUEST_BYTES``.

The answer must be a 2xx (a mutation can stay valid) or a 4xx with ``{"error": "<message>"}``; a
5xx other than 503 (a dependency refusing, e.g. the history queue) fails, and so does an example
slower than the hypothesis deadline. Bounded: ``SEEMLY_FUZZ_EXAMPLES`` examples per strategy and
endpoint (default 120) and derandomized, so CI is repeatable; set ``SEEMLY_FUZZ_RANDOM=1`` to explore.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests.backend_support import (
    BRUSH_CONFIG,
    PROJECT,
    PROJECT_ID,
    BackendUnderTest,
    interactive_body,
    keypoint,
    make_backend,
    make_scene,
    rectangle,
    save,
)

EXAMPLES = int(os.environ.get("SEEMLY_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),
    derandomize=not os.environ.get("SEEMLY_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MAX_BODY = 256 * 1024
ENDPOINTS = ("/predict", "/setup", "/webhook", "/train")


@pytest.fixture(scope="module")
def fuzz_app(
    postgres_engine: Engine, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BackendUnderTest, dict[str, dict[str, Any]]]]:
    images = tmp_path_factory.mktemp("fuzz-images")
    under_test = make_backend(postgres_engine, postgres_url, images, max_request_bytes=MAX_BODY)
    scene = make_scene(11, width=48, height=36)
    uri = save(scene, images, "scene.png")
    x, y = scene.pct("cat")
    valid = {
        "/predict": interactive_body(1, uri, [keypoint(scene, x, y), rectangle(scene, 60, 20, 30, 50)]),
        "/setup": {"project": PROJECT, "schema": BRUSH_CONFIG, "hostname": None, "access_token": None},
        "/webhook": {
            "action": "ANNOTATION_CREATED",
            "project": {"id": PROJECT_ID, "label_config": BRUSH_CONFIG},
            "task": {"id": 1, "data": {"image": uri}},
            "annotation": {
                "id": 5,
                "task": 1,
                "completed_by": 1,
                "result": [
                    {
                        "id": "r1",
                        "from_name": "tag",
                        "to_name": "image",
                        "type": "brushlabels",
                        "original_width": 48,
                        "original_height": 36,
                        "value": {"format": "rle", "rle": [0, 0, 0], "brushlabels": ["cat"]},
                    }
                ],
            },
        },
        "/train": {"project": PROJECT, "annotations": [], "label_config": BRUSH_CONFIG},
    }
    assert under_test.post("/setup", valid["/setup"]).status_code == 200
    assert under_test.post("/predict", valid["/predict"]).status_code == 200  # embeds once: later hits
    yield under_test, valid
    under_test.backend.history.close()


def check(response: Any, what: object) -> None:
    """2xx, or a 4xx/503 with a JSON error message; never a 500."""
    status = response.status_code
    assert status < 500 or status == 503, (
        f"{status} for {what!r:.600}: {response.get_data(as_text=True)[:300]}"
    )
    if status >= 400:
        body = response.get_json(silent=True)
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], (
            status,
            response.data[:300],
        )


# --- strategies ------------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        ["", "0", "-1", "1e999", "NaN", "brushlabels", "image", "ANNOTATION_CREATED", "../../etc"]
    )
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _mutate(base: dict[str, Any], path: tuple[Any, ...], action: str, replacement: Any) -> Any:
    if not path:
        return replacement
    out = copy.deepcopy(base)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    if action == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """``base`` with 1-3 fields replaced by junk (or numbers of every kind), or removed."""
    value: Any = base
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(value, dict):
            break
        paths = list(_paths(value))[1:]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "drop"]))
        replacement = draw(
            junk
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.integers(min_value=-(10**30), max_value=10**30)
            | st.sampled_from(
                ["keypointlabels", "rectanglelabels", "polygonlabels", "textarea", "choices", "zzz"]
            )
        )
        value = _mutate(value, path, action, replacement)
    return value


def deep(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def dumps(value: Any) -> bytes:
    # allow_nan: NaN / Infinity tokens are what a careless client sends, and Python's parser reads them
    return json.dumps(value, allow_nan=True).encode()


# --- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_junk_json_never_500s(fuzz_app: tuple[BackendUnderTest, Any], endpoint: str) -> None:
    app, _valid = fuzz_app

    @FUZZ
    @given(body=junk)
    def run(body: Any) -> None:
        check(app.client.post(endpoint, data=dumps(body), content_type="application/json"), body)

    run()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_near_valid_payloads_never_500(fuzz_app: tuple[BackendUnderTest, Any], endpoint: str) -> None:
    app, valid = fuzz_app

    @FUZZ
    @given(body=mutated(valid[endpoint]))
    def run(body: Any) -> None:
        check(app.client.post(endpoint, data=dumps(body), content_type="application/json"), body)

    run()


@st.composite
def prompt_values(draw: st.DrawFn) -> dict[str, Any]:
    number = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20) | junk
    return {
        "x": draw(number),
        "y": draw(number),
        "width": draw(number),
        "height": draw(number),
        "rotation": draw(number),
        "points": draw(st.lists(st.lists(number, max_size=3), max_size=5) | junk),
        "keypointlabels": draw(st.lists(st.text(max_size=5), max_size=2) | junk),
    }


def test_prompt_coordinates_and_tags_never_500(fuzz_app: tuple[BackendUnderTest, Any]) -> None:
    app, valid = fuzz_app

    @FUZZ
    @given(
        values=prompt_values(),
        kind=st.sampled_from(
            ["keypointlabels", "rectanglelabels", "polygonlabels", "brushlabels", "labels", "zz"]
        ),
        from_name=st.sampled_from(["point", "point_negative", "box", "tag", "nope", ""]),
        size=st.tuples(st.integers(-5, 10**9) | junk, st.integers(-5, 10**9) | junk),
    )
    def run(values: dict[str, Any], kind: str, from_name: str, size: tuple[Any, Any]) -> None:
        body = copy.deepcopy(valid["/predict"])
        region = body["params"]["context"]["result"][0]
        region.update(type=kind, from_name=from_name, value=values)
        region["original_width"], region["original_height"] = size
        check(app.client.post("/predict", data=dumps(body), content_type="application/json"), body)

    run()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_non_json_deep_and_oversize_bodies(fuzz_app: tuple[BackendUnderTest, Any], endpoint: str) -> None:
    app, valid = fuzz_app

    @FUZZ
    @given(data=st.binary(max_size=300))
    def run(data: bytes) -> None:
        check(app.client.post(endpoint, data=data, content_type="application/json"), data)

    run()
    for depth in (50, 500, 5000, 200_000):
        for kind in ("list", "dict"):
            check(app.client.post(endpoint, data=deep(depth, kind).encode()), (depth, kind))
    inside = dict(valid[endpoint])
    inside["tasks" if endpoint == "/predict" else "project"] = json.loads(deep(900, "list"))
    check(app.client.post(endpoint, data=dumps(inside)), "nested inside a valid body")
    big = dumps({**valid[endpoint], "pad": "x" * MAX_BODY})
    response = app.client.post(endpoint, data=big, content_type="application/json")
    assert response.status_code == 413 and "limit" in response.get_json()["error"]
    chunked = app.client.post(  # no Content-Length: cut off at the limit while reading
        endpoint,
        input_stream=io.BytesIO(b"{" + b" " * MAX_BODY + b"}"),
        content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},
    )
    check(chunked, "chunked")
    assert chunked.status_code in (400, 413)
    for weird in (b"\xff\xfe\x00", b"null", b"1e99999", b'"x"', b"[NaN]", b'{"a": NaN}', b"\x00" * 10):
        check(app.client.post(endpoint, data=weird), weird)


def test_wrong_methods_and_unknown_routes_answer_json(fuzz_app: tuple[BackendUnderTest, Any]) -> None:
    app, _valid = fuzz_app
    for method, path in (("GET", "/predict"), ("PUT", "/setup"), ("DELETE", "/webhook"), ("GET", "/nope")):
        response = app.client.open(path, method=method)
        assert response.status_code in (404, 405)
        assert isinstance(response.get_json()["error"], str)


def test_fuzzing_left_the_backend_healthy(fuzz_app: tuple[BackendUnderTest, Any]) -> None:
    app, valid = fuzz_app
    assert app.post("/predict", valid["/predict"]).status_code == 200
    assert app.client.get("/health").status_code == 200

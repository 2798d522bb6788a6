"""The Label Studio side without a server: templates, labeling-config parsing, connect's logic
(against a fake SDK client). The real-server checks are in test_e2e_plugin.py."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from plugin import connect as connect_module
from plugin.connect import (
    WEBHOOK_ACTIONS,
    ConnectError,
    connect_project,
    parse_labels,
    parse_s3_uri,
    redact_url,
)
from plugin.labeling_config import LabelingConfigError, ParsedConfig, parse_labeling_config
from plugin.templates import TEMPLATE_NAMES, TemplateError, render_config, validate_labels
from seemly.config import Settings

# --- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_each_template_parses(template: str) -> None:
    cfg = parse_labeling_config(render_config(template, ["cat", "dog"]))
    assert cfg.image.name == "image" and cfg.image.value == "$image" and cfg.image.data_key == "image"
    assert cfg.labels == ("cat", "dog")
    assert cfg.output.kind == ("BrushLabels" if template == "brush" else "PolygonLabels")
    assert [(p.name, p.negative, p.smart) for p in cfg.points] == [
        ("point", False, True),
        ("point_negative", True, True),
    ]
    assert [(b.name, b.smart) for b in cfg.boxes] == [("box", True)]
    assert cfg.text_prompt is not None and cfg.text_prompt.name == "prompt" and cfg.text_prompt.smart
    assert all(tag.labels == ("cat", "dog") for tag in (*cfg.points, *cfg.boxes))
    assert cfg.interactive and cfg.warnings == ()
    assert cfg.require_interactive() is cfg


def test_render_escapes_xml() -> None:
    nasty = ["a & b", 'say "hi"', "it's", "<tag>", "x]]>y", "naïve 猫"]
    xml = render_config("brush", nasty)
    assert "<tag>" not in xml and "a & b" not in xml
    cfg = parse_labeling_config(xml)
    assert cfg.labels == tuple(nasty)
    assert cfg.points[0].labels == tuple(nasty)


def test_render_has_no_placeholders_left() -> None:
    for template in TEMPLATE_NAMES:
        assert "{{" not in render_config(template, ["x"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "at least one label"),
        ([""], "is empty"),
        (["  "], "is empty"),
        ([" cat"], "whitespace"),
        (["cat", "dog", "cat"], "given twice"),
        (["Cat", "cat"], "given twice"),
        (["ca\x00t"], "control character"),
        (["ca\nt"], "control character"),
        (["ca\x7ft"], "control character"),
        (["a\u2028b"], "control character"),
        (["$image"], r"starts with '\$'"),
        (["x" * 201], "at most 200"),
        ("cat,dog", "not one string"),
        ([3], "not a string"),
    ],
)
def test_invalid_labels_are_refused(labels: Any, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render_config("brush", labels)


def test_validate_labels_keeps_order() -> None:
    assert validate_labels(("b", "a", "c")) == ["b", "a", "c"]


def test_unknown_template() -> None:
    with pytest.raises(TemplateError, match="unknown template 'mesh'"):
        render_config("mesh", ["a"])


# --- labeling config parsing --------------------------------------------------------------------

IMAGE = '<Image name="img" value="$url"/>'


def _view(*tags: str) -> str:
    return "<View>" + "".join(tags) + "</View>"


def test_missing_mask_tag_message() -> None:
    xml = _view(
        IMAGE, '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="a"/></KeyPointLabels>'
    )
    with pytest.raises(LabelingConfigError, match=r"no <BrushLabels> or <PolygonLabels> tag for the masks"):
        parse_labeling_config(xml)


def test_mask_tag_pointing_elsewhere_counts_as_missing() -> None:
    xml = _view(IMAGE, '<BrushLabels name="m" toName="other"><Label value="a"/></BrushLabels>')
    with pytest.raises(LabelingConfigError, match="for the masks"):
        parse_labeling_config(xml)


def test_missing_image_message() -> None:
    with pytest.raises(LabelingConfigError, match=r"no <Image> tag"):
        parse_labeling_config(_view('<BrushLabels name="m" toName="img"><Label value="a"/></BrushLabels>'))


def test_image_value_must_be_a_task_field() -> None:
    xml = _view(
        '<Image name="img" value="http://x/y.png"/>',
        '<BrushLabels name="m" toName="img"><Label value="a"/></BrushLabels>',
    )
    with pytest.raises(LabelingConfigError, match=r'value="\$image"'):
        parse_labeling_config(xml)


def test_minimal_config_is_not_interactive() -> None:
    xml = _view(
        IMAGE,
        '<PolygonLabels name="poly" toName="img"><Label value="a"/></PolygonLabels>',
        '<KeyPointLabels name="k" toName="img" smart="false"><Label value="a"/></KeyPointLabels>',
    )
    cfg = parse_labeling_config(xml)
    assert cfg.output.name == "poly" and cfg.brush is None and cfg.image.data_key == "url"
    assert not cfg.interactive
    with pytest.raises(LabelingConfigError, match="cannot prompt the model"):
        cfg.require_interactive()


def test_case_insensitive_tags_alias_labels_and_warnings() -> None:
    xml = _view(
        IMAGE,
        '<brushlabels name="m" toname="img"><Label value="Cat" alias="cat"/><Label value="dog"/></brushlabels>',
        '<KeypointLabels name="kp" toName="img" smart="false"><Label value="cat"/><Label value="bird"/></KeypointLabels>',
        '<RectangleLabels name="r" toName="img,img2" smartOnly="true"><View><Label value="dog"/></View></RectangleLabels>',
        '<TextArea name="notes" toName="img"/>',
        '<TextArea name="prompt" toName="img"/>',
        '<BrushLabels name="m2" toName="img"><Label value="x"/></BrushLabels>',
    )
    cfg = parse_labeling_config(xml)
    assert cfg.labels == ("cat", "dog")  # alias wins: that is what results carry
    assert cfg.points[0].smart is False and cfg.boxes[0].smart is True
    assert cfg.boxes[0].labels == ("dog",)  # labels nested in a <View> still count
    assert cfg.text_prompt is not None and cfg.text_prompt.name == "prompt"
    joined = " | ".join(cfg.warnings)
    assert "bird" in joined and 'smart="false"' in joined and "m2" in joined


def test_smart_defaults_to_on_like_label_studio() -> None:
    # Label Studio's frontend treats every control as smart unless smart="false".
    xml = _view(
        IMAGE,
        '<BrushLabels name="m" toName="img"><Label value="a"/></BrushLabels>',
        '<KeyPointLabels name="k" toName="img"><Label value="a"/></KeyPointLabels>',
    )
    cfg = parse_labeling_config(xml)
    assert cfg.points[0].smart is True and cfg.brush is not None and cfg.brush.smart is True


def test_control_lookup_and_roles() -> None:
    cfg = parse_labeling_config(render_config("brush", ["cat"]))
    assert cfg.control("mask").role == "mask"
    assert cfg.control("point").role == "point" and cfg.control("point").result_type == "keypointlabels"
    assert cfg.control("box").result_type == "rectanglelabels"
    assert cfg.control("prompt").role == "text"
    assert [t.name for t in cfg.prompts] == ["point", "point_negative", "box", "prompt"]
    with pytest.raises(KeyError):
        cfg.control("nope")


@pytest.mark.parametrize(
    ("result", "positive"),
    [
        ({"from_name": "point", "is_positive": True}, True),
        ({"from_name": "point", "is_positive": False}, False),  # Alt+click in Label Studio
        ({"from_name": "point"}, True),  # a non-smart point has no is_positive
        ({"from_name": "point_negative", "is_positive": True}, False),  # the background-point tag
        ({"from_name": "unknown", "is_positive": False}, False),
    ],
)
def test_point_polarity(result: dict[str, Any], positive: bool) -> None:
    cfg = parse_labeling_config(render_config("brush", ["cat"]))
    assert cfg.point_is_positive(result) is positive


def test_parsed_config_is_a_frozen_pydantic_model() -> None:
    cfg = parse_labeling_config(render_config("polygon", ["a"]))
    assert isinstance(cfg, ParsedConfig)
    assert ParsedConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(Exception):  # noqa: B017 (pydantic's ValidationError for frozen models)
        cfg.image = cfg.image  # type: ignore[misc]


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<View><Image name="img" value="$url"/><BrushLabels name="m" toName="img"><Label value="&lol3;"/></BrushLabels></View>"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE v [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<View><Image name="img" value="$url"/><BrushLabels name="m" toName="img"><Label value="&xxe;"/></BrushLabels></View>"""

EXTERNAL_DTD = """<?xml version="1.0"?>
<!DOCTYPE View SYSTEM "http://example.invalid/x.dtd">
<View><Image name="img" value="$url"/><BrushLabels name="m" toName="img"><Label value="a"/></BrushLabels></View>"""


@pytest.mark.parametrize(
    "xml", [BILLION_LAUGHS, XXE, EXTERNAL_DTD], ids=["billion-laughs", "xxe", "external-dtd"]
)
def test_dtds_and_entities_are_refused(xml: str) -> None:
    with pytest.raises(LabelingConfigError, match=r"DTDs and entities are not allowed|not well-formed"):
        parse_labeling_config(xml)


def test_undeclared_entity_is_refused() -> None:
    with pytest.raises(LabelingConfigError):
        parse_labeling_config(
            _view(IMAGE, '<BrushLabels name="m" toName="img"><Label value="&nope;"/></BrushLabels>')
        )


@pytest.mark.parametrize("text", ["", "   ", "<View>", "not xml at all", b"\xff\xfe<View/>"])
def test_malformed_config(text: str | bytes) -> None:
    with pytest.raises(LabelingConfigError):
        parse_labeling_config(text)


def test_oversized_config() -> None:
    with pytest.raises(LabelingConfigError, match="at most"):
        parse_labeling_config("<View>" + " " * 1_000_001 + "</View>")


def test_comments_and_bytes_input() -> None:
    xml = render_config("brush", ["a"]).encode()
    assert parse_labeling_config(xml).labels == ("a",)


# --- connect helpers ----------------------------------------------------------------------------


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("http://bucket/x", "s3:///x", "bucket/x", "s3://b/x?y=1"):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


def test_parse_labels_and_redact() -> None:
    assert parse_labels(" cat, dog ,,") == ["cat", "dog"]
    assert redact_url("http://user:pw@host:9090/x") == "http://***@host:9090/x"
    assert redact_url("http://host:9090") == "http://host:9090"


# --- connect against a fake client ------------------------------------------------------------


class FakeLabelStudio:
    """Just enough of label_studio_sdk.LabelStudio for connect_project, with Label Studio's quirks:
    a new ML backend gets an all-actions webhook at <url>/webhook; a PATCH of a backend needs url+project."""

    def __init__(self) -> None:
        ids = itertools.count(1)
        self.projects_ = {}
        self.backends_ = {}
        self.hooks_ = {}
        self.imports_ = {}
        self.exports_ = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        fake = self

        def record(name: str, kwargs: dict[str, Any]) -> None:
            fake.calls.append((name, kwargs))

        class Projects:
            def list(self, title: str | None = None) -> list[Any]:
                return [
                    p for p in fake.projects_.values() if title is None or title.lower() in p.title.lower()
                ]

            def get(self, id: int) -> Any:
                return fake.projects_[id]

            def create(self, **kw: Any) -> Any:
                record("projects.create", kw)
                p = SimpleNamespace(id=next(ids), title=kw["title"], label_config=kw["label_config"])
                fake.projects_[p.id] = p
                return p

            def update(self, id: int, **kw: Any) -> Any:
                record("projects.update", kw)
                fake.projects_[id].label_config = kw["label_config"]
                return fake.projects_[id]

        class Ml:
            def list(self, project: int) -> list[Any]:
                return [b for b in fake.backends_.values() if b.project == project]

            def create(self, **kw: Any) -> Any:
                record("ml.create", kw)
                b = SimpleNamespace(
                    id=next(ids), project=kw["project"], url=kw["url"], title=kw.get("title"),
                    is_interactive=kw.get("is_interactive", False), auth_method=kw.get("auth_method", "NONE"),
                    basic_auth_user=kw.get("basic_auth_user"),
                )  # fmt: skip
                fake.backends_[b.id] = b
                h = SimpleNamespace(id=next(ids), project=b.project, url=b.url.rstrip("/") + "/webhook", actions=[],
                                    send_for_all_actions=True, send_payload=True, is_active=True)  # fmt: skip
                fake.hooks_[h.id] = h
                return b

            def update(self, id: int, **kw: Any) -> Any:
                record("ml.update", kw)
                assert "url" in kw and "project" in kw, "Label Studio answers 500 without url and project"
                for key, value in kw.items():
                    setattr(fake.backends_[id], key, value)
                return fake.backends_[id]

        class Webhooks:
            def list(self, project: str | None = None) -> list[Any]:
                return list(fake.hooks_.values())

            def create(self, **kw: Any) -> Any:
                record("webhooks.create", kw)
                h = SimpleNamespace(id=next(ids), **kw)
                fake.hooks_[h.id] = h
                return h

            def update(self, id: int, **kw: Any) -> Any:
                record("webhooks.update", kw)
                for key, value in kw.items():
                    setattr(fake.hooks_[id], key, value)
                return fake.hooks_[id]

        def storage_api(store: dict[int, Any], name: str) -> Any:
            class Api:
                def list(self, project: int) -> list[Any]:
                    return [s for s in store.values() if s.project == project]

                def create(self, **kw: Any) -> Any:
                    record(f"{name}.create", kw)
                    s = SimpleNamespace(id=next(ids), **kw)
                    store[s.id] = s
                    return s

                def sync(self, id: int) -> Any:
                    record(f"{name}.sync", {"id": id})
                    return SimpleNamespace(id=id, status="completed", last_sync_count=0)

            return Api()

        self.projects = Projects()
        self.ml = Ml()
        self.webhooks = Webhooks()
        self.import_storage = SimpleNamespace(s3=storage_api(self.imports_, "import"))
        self.export_storage = SimpleNamespace(s3=storage_api(self.exports_, "export"))


SETTINGS = Settings(
    s3_endpoint_url="http://127.0.0.1:9000",
    s3_access_key_id="AKIA-TEST",
    s3_secret_access_key="very-secret",
    backend_basic_auth_user="ls",
    backend_basic_auth_password="backend-secret",
)


def _full(client: FakeLabelStudio, **kw: Any) -> Any:
    args = dict(
        title="P",
        labels=["cat"],
        backend_url="http://127.0.0.1:9090/",
        s3_source="s3://b/in",
        s3_target="s3://b/out",
        settings=SETTINGS,
    )
    args.update(kw)
    return connect_project(client, **args)


def test_connect_creates_everything_once() -> None:
    client = FakeLabelStudio()
    first = _full(client)
    assert [s.line().split(" ")[0] for s in first.steps][:1] == ["project"]
    assert {(s.step, s.action) for s in first.steps} >= {
        ("project", "created"),
        ("ML backend", "created"),
        ("webhook", "updated"),
        ("S3 source", "created"),
        ("S3 source", "synced"),
        ("S3 target", "created"),
    }
    backend = client.backends_[first.ml_backend_id]
    assert backend.url == "http://127.0.0.1:9090" and backend.is_interactive
    create_kw = next(kw for name, kw in client.calls if name == "ml.create")
    assert create_kw["auth_method"] == "BASIC_AUTH" and create_kw["basic_auth_pass"] == "backend-secret"
    (hook,) = client.hooks_.values()
    assert sorted(hook.actions) == sorted(WEBHOOK_ACTIONS) and hook.send_for_all_actions is False
    source = client.imports_[first.import_storage_id]
    assert (source.bucket, source.prefix, source.s3endpoint, source.aws_secret_access_key) == (
        "b",
        "in",
        "http://127.0.0.1:9000",
        "very-secret",
    )
    assert source.use_blob_urls is True

    second = _full(client)
    assert not second.changed
    assert len(client.projects_) == 1 and len(client.backends_) == 1 and len(client.hooks_) == 1
    assert len(client.imports_) == 1 and len(client.exports_) == 1
    assert [name for name, _ in client.calls].count("import.sync") == 2

    for secret in ("very-secret", "AKIA-TEST", "backend-secret"):
        assert secret not in first.report() + second.report() + second.model_dump_json()


def test_connect_repairs_a_non_interactive_backend_and_warns_about_others() -> None:
    client = FakeLabelStudio()
    first = _full(client, s3_source=None, s3_target=None)
    client.backends_[first.ml_backend_id].is_interactive = False
    client.ml.create(project=first.project_id, url="http://other:1", is_interactive=True)
    again = _full(client, s3_source=None, s3_target=None)
    assert [s.action for s in again.steps if s.step == "ML backend"] == ["updated"]
    assert client.backends_[first.ml_backend_id].is_interactive
    assert any("also interactive" in w for w in again.warnings)


def test_connect_without_backend_skips_backend_and_webhook() -> None:
    client = FakeLabelStudio()
    result = connect_project(client, title="P", settings=SETTINGS)
    assert {s.step: s.action for s in result.steps}["ML backend"] == "skipped"
    assert {s.step: s.action for s in result.steps}["webhook"] == "skipped"
    assert result.labels == ["object"]
    assert not client.backends_ and not client.hooks_


def test_connect_updates_config_and_keeps_labels() -> None:
    client = FakeLabelStudio()
    connect_project(client, title="P", labels=["a", "b"], settings=SETTINGS)
    again = connect_project(client, title="P", template="polygon", settings=SETTINGS)
    assert again.labels == ["a", "b"]
    assert [s.action for s in again.steps if s.step == "labeling config"] == ["updated"]
    kept = connect_project(client, title="P", labels=["z"], keep_config=True, settings=SETTINGS)
    assert kept.labels == ["a", "b"]


def test_connect_refuses_bad_input() -> None:
    client = FakeLabelStudio()
    with pytest.raises(TemplateError):
        connect_project(client, title="P", labels=["a", "a"], settings=SETTINGS)
    with pytest.raises(ConnectError, match="title is empty"):
        connect_project(client, title=" ", settings=SETTINGS)
    with pytest.raises(LabelingConfigError, match="for the masks"):
        connect_project(client, title="P", label_config=_view(IMAGE), settings=SETTINGS)
    with pytest.raises(ValueError, match="s3://"):
        connect_project(client, title="P", s3_source="http://x/y", settings=SETTINGS)
    assert not client.projects_ or all(p.title == "P" for p in client.projects_.values())


def test_sdk_errors_name_the_step() -> None:
    client = FakeLabelStudio()

    class Boom(Exception):
        status_code = 400
        body = "{'detail': 'nope'}"

    def fail(**kw: Any) -> Any:
        raise Boom()

    client.ml.create = fail  # type: ignore[method-assign]
    with pytest.raises(ConnectError, match=r"connect the ML backend .* HTTP 400"):
        connect_project(client, title="P", backend_url="http://127.0.0.1:9090", settings=SETTINGS)


def test_cli_is_registered_and_needs_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from seemly import cli

    assert cli.COMMANDS[("ls", "connect")][0] == "plugin.connect"
    monkeypatch.delenv("SEEMLY_LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.setattr(connect_module, "get_settings", lambda: Settings())
    code = cli.main(["ls", "connect", "--url", "http://127.0.0.1:1", "--project", "P"])
    assert code == 2
    assert "no API key" in capsys.readouterr().err

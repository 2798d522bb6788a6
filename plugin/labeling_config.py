"""Read a Label Studio labeling config: which tags seemly prompts and answers with.

One function, :func:`parse_labeling_config`, turns the project's XML into a :class:`ParsedConfig`:

* ``image``    the ``<Image>`` the masks are drawn on (its ``name`` is every result's ``to_name``;
               its ``value``, e.g. ``$image``, names the task field holding the image URL);
* ``brush``    the ``<BrushLabels>`` for mask output (``None`` if the config has none);
* ``polygon``  the ``<PolygonLabels>`` for polygon output (``None`` if none); at least one of the two;
* ``points``   every ``<KeyPointLabels>`` on that image: click prompts. A tag whose name ends in
               ``negative`` (``point_negative``) holds background points; on any other tag a point is
               positive unless Label Studio marks it ``"is_positive": false`` (Alt+click);
* ``boxes``    every ``<RectangleLabels>`` on that image: box prompts;
* ``text_prompt`` the ``<TextArea>`` on that image used as a text prompt (the one named ``prompt``
               if there are several), or ``None``.

A config that cannot work raises :class:`LabelingConfigError` whose message names what is missing,
e.g. ``the labeling config has no <BrushLabels> or <PolygonLabels> tag for the masks``.

The XML is parsed without DTDs, entity expansion or network access: a ``<!DOCTYPE>`` or an entity
is refused outright (Label Studio configs never need one; billion-laughs and XXE need one).

Use it from the ML backend::

    cfg = parse_labeling_config(label_config)          # once per /setup
    tag = cfg.control(result["from_name"])              # per context result from Label Studio
    if tag.role == "point":
        positive = cfg.point_is_positive(result)
    out = cfg.output                                    # where the answer goes: from_name/to_name/type
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from lxml import etree
from pydantic import BaseModel, ConfigDict

__all__ = [
    "ControlTag",
    "ImageTag",
    "LabelingConfigError",
    "ParsedConfig",
    "parse_labeling_config",
]

MAX_CONFIG_BYTES = 1_000_000

ControlKind = Literal["BrushLabels", "PolygonLabels", "KeyPointLabels", "RectangleLabels", "TextArea"]
Role = Literal["mask", "polygon", "point", "box", "text"]

# Label Studio's tag names are case-insensitive (``KeypointLabels`` works as well).
_KINDS: dict[str, ControlKind] = {
    "brushlabels": "BrushLabels",
    "polygonlabels": "PolygonLabels",
    "keypointlabels": "KeyPointLabels",
    "rectanglelabels": "RectangleLabels",
    "textarea": "TextArea",
}
_ROLES: dict[ControlKind, Role] = {
    "BrushLabels": "mask",
    "PolygonLabels": "polygon",
    "KeyPointLabels": "point",
    "RectangleLabels": "box",
    "TextArea": "text",
}
_NEGATIVE_SUFFIXES = ("negative", "_neg", "-neg")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class LabelingConfigError(ValueError):
    """The labeling config is not XML, is unsafe XML, or lacks a tag seemly needs (the message says which)."""


class ImageTag(BaseModel):
    """The ``<Image>`` object tag the masks belong to."""

    model_config = ConfigDict(frozen=True)

    name: str
    """Its ``name``: the ``to_name`` of every result on it."""
    value: str
    """Its ``value`` as written, e.g. ``$image``."""

    @property
    def data_key(self) -> str:
        """The task-data field with the image URL: ``$image`` -> ``image``."""
        return self.value[1:]


class ControlTag(BaseModel):
    """One control tag that seemly reads prompts from or writes results to."""

    model_config = ConfigDict(frozen=True)

    kind: ControlKind
    name: str
    """Its ``name``: the ``from_name`` of its results."""
    to_name: str
    """The object tag it labels (the image's name)."""
    labels: tuple[str, ...] = ()
    """Label values as they appear in results (a ``<Label>``'s ``alias`` if it has one, else ``value``)."""
    smart: bool = True
    """Label Studio sends regions drawn with this tag's smart tool to the ML backend (with Auto-Annotation
    on). Label Studio's default: on unless ``smart="false"``; ``smartOnly="true"`` hides the manual tool."""
    negative: bool = False
    """Key points only: every point of this tag is a background (negative) point."""

    @property
    def role(self) -> Role:
        """``mask`` | ``polygon`` (outputs), ``point`` | ``box`` | ``text`` (prompts)."""
        return _ROLES[self.kind]

    @property
    def result_type(self) -> str:
        """The ``type`` of this tag's results and the key of its label list in ``value``: ``brushlabels``..."""
        return self.kind.lower()


class ParsedConfig(BaseModel):
    """What seemly needs to know about a project's labeling config (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    image: ImageTag
    brush: ControlTag | None = None
    polygon: ControlTag | None = None
    points: tuple[ControlTag, ...] = ()
    boxes: tuple[ControlTag, ...] = ()
    text_prompt: ControlTag | None = None
    warnings: tuple[str, ...] = ()
    """Things that work but are probably not meant (a prompt label no output tag has, ...)."""

    @property
    def output(self) -> ControlTag:
        """The tag predictions are written to: ``brush`` if the config has one, else ``polygon``."""
        tag = self.brush or self.polygon
        assert tag is not None  # guaranteed by parse_labeling_config
        return tag

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names of the output tag, in config order."""
        return self.output.labels

    @property
    def controls(self) -> tuple[ControlTag, ...]:
        """Every tag seemly uses: outputs first, then prompts."""
        tags = [self.brush, self.polygon, *self.points, *self.boxes, self.text_prompt]
        return tuple(t for t in tags if t is not None)

    @property
    def prompts(self) -> tuple[ControlTag, ...]:
        """The prompt tags (points, boxes, text)."""
        return tuple(t for t in self.controls if t.role in ("point", "box", "text"))

    @property
    def interactive(self) -> bool:
        """True when an annotator can prompt the model: a smart point or box tag, or a smart text prompt."""
        prompts = (*self.points, *self.boxes, *([self.text_prompt] if self.text_prompt else []))
        return any(t.smart for t in prompts)

    def control(self, from_name: str) -> ControlTag:
        """The tag a result came from (its ``from_name``); ``KeyError`` if seemly does not use it."""
        for tag in self.controls:
            if tag.name == from_name:
                return tag
        raise KeyError(from_name)

    def point_is_positive(self, result: Mapping[str, Any]) -> bool:
        """Whether a ``keypointlabels`` result from Label Studio is a foreground click.

        Negative when it comes from a negative key-point tag (name ending in ``negative``), or
        when Label Studio sent ``"is_positive": false`` (a smart point placed with Alt/Option+click).
        A result without ``is_positive`` (a manual, non-smart point) counts as positive.
        """
        try:
            tag = self.control(str(result.get("from_name", "")))
        except KeyError:
            tag = None
        if tag is not None and tag.negative:
            return False
        return result.get("is_positive", True) is not False

    def require_interactive(self) -> ParsedConfig:
        """Return ``self``, or raise :class:`LabelingConfigError` when nothing in it can prompt the model."""
        if not self.interactive:
            raise LabelingConfigError(
                f"the labeling config has no smart <KeyPointLabels>, <RectangleLabels> or <TextArea> tag "
                f'for image "{self.image.name}", so annotators cannot prompt the model'
            )
        return self


def _parse_xml(config: str | bytes) -> etree._Element:
    data = config.encode("utf-8") if isinstance(config, str) else bytes(config)
    if len(data) > MAX_CONFIG_BYTES:
        raise LabelingConfigError(f"the labeling config is {len(data)} bytes: at most {MAX_CONFIG_BYTES}")
    if not data.strip():
        raise LabelingConfigError("the labeling config is empty")
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise LabelingConfigError(f"the labeling config is not well-formed XML: {exc}") from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise LabelingConfigError("the labeling config has a <!DOCTYPE>: DTDs and entities are not allowed")
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise LabelingConfigError(
                f"the labeling config uses the entity &{node.name};: DTDs and entities are not allowed"
            )
    return root


def _attrs(element: etree._Element) -> dict[str, str]:
    """Attributes with lower-cased names (Label Studio reads ``toName`` and ``toname`` alike)."""
    return {str(k).lower(): str(v) for k, v in element.attrib.items()}


def _tag(element: etree._Element) -> str | None:
    tag = element.tag
    if not isinstance(tag, str):  # comments, processing instructions, entities
        return None
    return etree.QName(tag).localname.lower()


def _labels(element: etree._Element) -> tuple[str, ...]:
    values: list[str] = []
    for child in element.iter():
        if child is element or _tag(child) != "label":
            continue
        attrs = _attrs(child)
        value = attrs.get("alias") or attrs.get("value")
        if value is not None:
            values.append(value)
    return tuple(values)


def _control(kind: ControlKind, element: etree._Element, to_name: str) -> ControlTag:
    attrs = _attrs(element)
    name = attrs["name"]
    # Label Studio's frontend defaults every control to smart (ControlBase ``smart: true``): only an
    # explicit smart="false" turns it off, and smartOnly="true" forces it on.
    smart = attrs.get("smart", "true").lower() not in _FALSE or attrs.get("smartonly", "").lower() in _TRUE
    negative = kind == "KeyPointLabels" and name.lower().endswith(_NEGATIVE_SUFFIXES)
    labels = () if kind == "TextArea" else _labels(element)
    return ControlTag(kind=kind, name=name, to_name=to_name, labels=labels, smart=smart, negative=negative)


def _first(tags: Iterable[ControlTag]) -> ControlTag | None:
    return next(iter(tags), None)


def parse_labeling_config(config: str | bytes) -> ParsedConfig:
    """Parse a Label Studio labeling config (XML) into a :class:`ParsedConfig`.

    Raises :class:`LabelingConfigError` when the text is not well-formed XML, has a DTD or entity,
    has no ``<Image>``, no ``<BrushLabels>``/``<PolygonLabels>`` on an image, or an ``<Image>``
    whose ``value`` is not a task field (``$name``).
    """
    root = _parse_xml(config)

    images: dict[str, dict[str, str]] = {}
    controls: list[tuple[ControlKind, etree._Element, list[str]]] = []
    for element in root.iter():
        tag = _tag(element)
        if tag is None:
            continue
        attrs = _attrs(element)
        if tag == "image" and "name" in attrs:
            images.setdefault(attrs["name"], attrs)
        elif tag in _KINDS and "name" in attrs:
            targets = [t.strip() for t in attrs.get("toname", "").split(",") if t.strip()]
            controls.append((_KINDS[tag], element, targets))

    if not images:
        raise LabelingConfigError(
            'the labeling config has no <Image> tag (e.g. <Image name="image" value="$image"/>)'
        )

    # The image the masks are drawn on: the first image an output tag points at.
    image_name: str | None = None
    for kind, _element, targets in controls:
        if kind in ("BrushLabels", "PolygonLabels"):
            image_name = next((t for t in targets if t in images), None)
            if image_name:
                break
    if image_name is None:
        raise LabelingConfigError(
            "the labeling config has no <BrushLabels> or <PolygonLabels> tag for the masks "
            f"(with toName pointing at an <Image>: {', '.join(sorted(images))})"
        )
    value = images[image_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelingConfigError(
            f'the <Image name="{image_name}"> tag\'s value must name a task field, like value="$image" '
            f"(it is {value!r})"
        )
    image = ImageTag(name=image_name, value=value)

    on_image = [
        _control(kind, element, image_name) for kind, element, targets in controls if image_name in targets
    ]
    by_kind: dict[ControlKind, list[ControlTag]] = {kind: [] for kind in _ROLES}
    for tag in on_image:
        by_kind[tag.kind].append(tag)

    texts = by_kind["TextArea"]
    text_prompt = next((t for t in texts if t.name == "prompt"), _first(texts))

    brush = _first(by_kind["BrushLabels"])
    polygon = _first(by_kind["PolygonLabels"])
    output_labels = set((brush or polygon).labels if (brush or polygon) else ())
    warnings: list[str] = []
    for tag in (*by_kind["BrushLabels"][1:], *by_kind["PolygonLabels"][1:]):
        warnings.append(f"<{tag.kind} name={tag.name!r}> is ignored: seemly writes to the first one only")
    for tag in (*by_kind["KeyPointLabels"], *by_kind["RectangleLabels"]):
        missing = [label for label in tag.labels if label not in output_labels]
        if missing:
            warnings.append(
                f"<{tag.kind} name={tag.name!r}> has labels the output tag lacks: {', '.join(missing)}"
            )
        if not tag.smart:
            warnings.append(
                f'<{tag.kind} name={tag.name!r}> has smart="false": Label Studio will not send its regions '
                "to the ML backend as you draw them"
            )

    return ParsedConfig(
        image=image,
        brush=brush,
        polygon=polygon,
        points=tuple(by_kind["KeyPointLabels"]),
        boxes=tuple(by_kind["RectangleLabels"]),
        text_prompt=text_prompt,
        warnings=tuple(warnings),
    )

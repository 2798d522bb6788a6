"""Labeling-config templates for interactive segmentation in the stock Label Studio UI.

The templates live in ``plugin/templates/<name>.xml`` and carry two placeholders, each on a line of
its own inside a control tag:

``{{labels}}``
    one ``<Label value="..." background="..."/>`` per class, a colour per class;
``{{labels_negative}}``
    the same class names, in the "background point" colour (for the negative key-point tag).

:func:`render_config` fills them in with XML-escaped, validated label names. Every control tag of a
template gets the same label names, so a prompt labelled "cat" produces a "cat" mask.

>>> xml = render_config("brush", ["cat", "dog"])
>>> '<Label value="cat"' in xml
True
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import cache
from importlib import resources
from xml.sax.saxutils import quoteattr

TEMPLATE_NAMES: tuple[str, ...] = ("brush", "polygon")
"""Templates shipped in ``plugin/templates/``: ``brush`` (BrushLabels masks), ``polygon`` (PolygonLabels)."""

MAX_LABELS = 200
MAX_LABEL_LENGTH = 200

# Distinct, readable on photos; cycled when there are more classes.
PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#17becf",
    "#bcbd22",
    "#e377c2",
    "#8c564b",
    "#7f7f7f",
    "#d62728",
)
NEGATIVE_COLOR = "#ff4d4f"

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{\{(?P<name>labels|labels_negative)\}\}[ \t]*$", re.MULTILINE)
_ANY_PLACEHOLDER = re.compile(r"\{\{[^{}]*\}\}")


class TemplateError(ValueError):
    """An unknown template or an invalid list of label names (the message says which and why)."""


@cache
def load_template(template: str) -> str:
    """The raw text of a shipped template (placeholders unfilled)."""
    if template not in TEMPLATE_NAMES:
        raise TemplateError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
    return resources.files("plugin").joinpath("templates", f"{template}.xml").read_text(encoding="utf-8")


def _bad_char(ch: str) -> bool:
    # Control characters (C0, DEL, C1), lone surrogates, the two XML non-characters and line/paragraph
    # separators: none of them belongs in a class name, several cannot even be written in XML 1.0.
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in ("\ufffe", "\uffff")


def validate_labels(labels: Sequence[str]) -> list[str]:
    """Check class names and return them as a list, in order.

    Rules: at least one; at most :data:`MAX_LABELS`; each a non-empty string without leading or
    trailing whitespace, at most :data:`MAX_LABEL_LENGTH` characters, no control characters, not
    starting with ``$`` (Label Studio reads ``$name`` as a task-data reference); no duplicates
    (compared case-insensitively, because two labels that differ only in case are a typo).
    """
    if isinstance(labels, str):
        raise TemplateError("labels must be a list of names, not one string (split it on commas first)")
    names = list(labels)
    if not names:
        raise TemplateError("at least one label is needed")
    if len(names) > MAX_LABELS:
        raise TemplateError(f"{len(names)} labels: at most {MAX_LABELS} are supported")
    seen: dict[str, str] = {}
    for position, name in enumerate(names, start=1):
        if not isinstance(name, str):
            raise TemplateError(f"label #{position} is {type(name).__name__}, not a string")
        if not name.strip():
            raise TemplateError(f"label #{position} is empty")
        if name != name.strip():
            raise TemplateError(f"label #{position} {name!r} has leading or trailing whitespace")
        if len(name) > MAX_LABEL_LENGTH:
            raise TemplateError(
                f"label #{position} is {len(name)} characters long: at most {MAX_LABEL_LENGTH}"
            )
        bad = [ch for ch in name if _bad_char(ch)]
        if bad:
            raise TemplateError(f"label #{position} {name!r} contains a control character ({bad[0]!r})")
        if name.startswith("$"):
            raise TemplateError(
                f"label #{position} {name!r} starts with '$', which Label Studio reads as a variable"
            )
        key = name.casefold()
        if key in seen:
            raise TemplateError(f"label {name!r} is given twice (as {seen[key]!r} before)")
        seen[key] = name
    return names


def label_lines(labels: Sequence[str], indent: str = "    ", *, negative: bool = False) -> str:
    """``<Label .../>`` lines for validated ``labels``; attribute values are XML-escaped."""
    lines = []
    for index, name in enumerate(labels):
        color = NEGATIVE_COLOR if negative else PALETTE[index % len(PALETTE)]
        lines.append(f"{indent}<Label value={quoteattr(name)} background={quoteattr(color)}/>")
    return "\n".join(lines)


def render_config(template: str, labels: Sequence[str]) -> str:
    """The labeling config of ``template`` (``"brush"`` or ``"polygon"``) for these class names.

    Raises :class:`TemplateError` for an unknown template or invalid labels. The result is plain
    Label Studio XML, ready for ``projects.update(label_config=...)``; it parses with
    :func:`plugin.labeling_config.parse_labeling_config`.
    """
    names = validate_labels(labels)
    text = load_template(template)

    def fill(match: re.Match[str]) -> str:
        return label_lines(
            names, match.group("indent") or "    ", negative=match.group("name") == "labels_negative"
        )

    rendered = _PLACEHOLDER.sub(fill, text)
    leftover = _ANY_PLACEHOLDER.search(rendered)
    if leftover:  # a template bug, not a user error
        raise TemplateError(f"template {template!r} has an unknown placeholder {leftover.group(0)}")
    return rendered

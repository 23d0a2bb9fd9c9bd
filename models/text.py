"""An item's text from its columns: the one join of fields that ingest's ``text`` column and the encoder use.

A template names ``items.parquet`` columns in braces (``"{title}. {description}"``, the
default); blank fields are empty, whitespace is collapsed, and an item whose every field is
blank gets the empty text.
"""

from __future__ import annotations

import functools
import string
from typing import Any, Mapping

DEFAULT_TEXT_TEMPLATE = "{title}. {description}"


def template_fields(template: str) -> list[str]:
    """Names of the ``{placeholders}`` in ``template``; only plain names are allowed."""
    return list(_parsed_fields(template))


@functools.lru_cache(maxsize=64)
def _parsed_fields(template: str) -> tuple[str, ...]:
    """:func:`template_fields`, parsed once per template (ingest fills one template for every item)."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"text template {template!r} is not a valid format string: {e}") from e
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"text template {template!r}: use plain {{column}} placeholders, got {{{name}}}")
        names.append(name)
    return tuple(names)


def apply_text_template(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``fields`` (None -> ""), collapse whitespace, strip the ends.

    Returns "" when every placeholder is blank, so that ``"{title}. {description}"`` of an item
    with neither is empty rather than ".".
    """
    names = template_fields(template)
    values = {n: " ".join(str(fields[n]).split()) if fields.get(n) is not None else "" for n in names}
    if names and not any(values.values()):
        return ""
    return " ".join(template.format_map(values).split())


def cap_text(template: str, fields: Mapping[str, Any], max_chars: int) -> tuple[str, bool]:
    """:func:`apply_text_template` cut to ``max_chars`` characters: ``(text, truncated)``.

    Each field is cut to ``2 * max_chars`` characters before the template splits it into words,
    so a huge field costs no more than a long one.
    """
    cut = False
    capped: dict[str, Any] = {}
    for name in template_fields(template):
        value = fields.get(name)
        if value is not None and len(value := str(value)) > 2 * max_chars:
            value, cut = value[: 2 * max_chars], True
        capped[name] = value
    text = apply_text_template(template, capped)
    if len(text) > max_chars:
        text, cut = text[:max_chars].rstrip(), True
    return text, cut

"""An item's text from its columns: the one join of fields that ingest's ``text`` column and the encoder use.

A template names ``items.parquet`` columns in braces (``"{title}. {description}"``, the
default); blank fields are empty, whitespace is collapsed, and an item whose every field is
blank gets the empty text.
"""

from __future__ import annotations

import functools
import string
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_TEXT_TEMPLATE = "{title}. {description}"
# what str.split() splits on (the characters for which str.isspace() holds) in RE2, without the space
_OTHER_SPACE = r"\t-\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
# a run of it that is not already one plain space (so single spaces, the common case, are not rewritten)
_SPACE_RUN = rf" [ {_OTHER_SPACE}]+|[{_OTHER_SPACE}][ {_OTHER_SPACE}]*"


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


def apply_text_template_columns(template: str, columns: Mapping[str, pa.Array | pa.ChunkedArray],
                                n: int) -> pa.Array:
    """:func:`apply_text_template` for ``n`` rows at once, in Arrow compute (no Python string per row).

    ``columns`` maps each placeholder to ``n`` strings (null -> ""); the result equals
    ``[apply_text_template(template, row) for row in rows]`` value for value.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def collapse(values):
        return pc.utf8_trim(pc.replace_substring_regex(values, _SPACE_RUN, " "), " ")

    names = template_fields(template)
    if not names:
        return pa.array([" ".join(template.split())] * n, pa.large_string())
    fields = {}
    for name in names:
        col = columns[name]
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        fields[name] = collapse(pc.fill_null(pc.cast(col, pa.large_string()), ""))
    parts: list[Any] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            parts.append(pa.scalar(literal, pa.large_string()))
        if name is not None:
            parts.append(fields[name])
    text = collapse(pc.binary_join_element_wise(*parts, pa.scalar("", pa.large_string())))
    blank = functools.reduce(pc.and_, [pc.equal(f, "") for f in fields.values()])
    return pc.if_else(blank, pa.scalar("", pa.large_string()), text)


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

"""Checks on a rendered report shared by the report and experiment tests."""

from __future__ import annotations

import html
import re

DOTTED_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[\w@-]+)+$")  # a flattened JSON path, e.g. counts.fit_items
SUMMARISED_LIST = re.compile(r"^\d+ values(, first|$)")  # "384 values, first 0.003889, ..."


def raw_dumps(page: str) -> dict[str, list[str]]:
    """Per section id, the table headers and cells of ``page`` that show a JSON artifact dumped as it is."""
    found: dict[str, list[str]] = {}
    for sid, body in re.findall(r'<section id="([\w-]+)">(.*?)</section>', page, re.S):
        bad = []
        for table in re.findall(r"<table>(.*?)</table>", body, re.S):
            headers = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", table)]
            if headers[:2] == ["key", "value"]:
                bad.append("a key / value table")
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", table, re.S):
                text = html.unescape(cell).strip()
                if DOTTED_KEY.match(text) or SUMMARISED_LIST.match(text) or text[:1] in ("{", "["):
                    bad.append(text)
        if bad:
            found[sid] = bad
    return found

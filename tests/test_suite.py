"""How the suite is run: the fast part the README documents, and CI running every test."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO


def test_readme_documents_the_fast_part_and_ci_runs_everything():
    readme = (REPO / "README.md").read_text()
    assert '.venv/bin/python -m pytest -m "not slow"' in readme
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if re.search(r"-m pytest\b", line)]
    assert ci and all(not re.search(r"\s(-m\s+['\"]|-k\s|--deselect)", line.split("-m pytest", 1)[1]) for line in ci)
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in options["markers"]) and "--strict-markers" in options["addopts"]

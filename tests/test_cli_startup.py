"""Start-up of the command line: ``--help`` and ``status`` import no heavy library.

torch, faiss, pandas and matplotlib are imported only when a stage runs or a query is answered
(the figures are in BENCHMARKS.md, "Command-line start-up"); these tests check which modules a
fresh interpreter holds afterwards, not how long it took.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

from clearrec.pipeline import stage as stage_module
from clearrec.pipeline.stage import StageSpec, module_source

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "pandas", "matplotlib")


def heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it imported."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_no_stage_and_no_heavy_library():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from clearrec.pipeline.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0 and 'ingest' in result.output, result.output\n"
        "result = CliRunner().invoke(app, ['run', '--help'])\n"
        "assert result.exit_code == 0 and 'index' in result.output, result.output\n"
        "assert not [m for m in sys.modules if m.startswith('clearrec.stages')], 'a stage was imported'\n"
        "assert 'pyarrow' not in sys.modules and 'numpy' not in sys.modules, 'help needs no data library'\n"
    )
    assert heavy_modules_after(code) == []


def test_status_and_every_stage_fingerprint_import_no_heavy_library(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    encoder = tmp_path / "text-encoder"  # a local encoder folder: encode's external inputs list its files
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    config = REPO / "sample_data" / "clearrec.toml"
    code = (
        "import json\n"
        "from typer.testing import CliRunner\n"
        "from clearrec.pipeline.cli import app\n"
        f"args = ['status', '--config', {str(config)!r}, '--workdir', {str(work)!r}, "
        f"'--set', 'encode.modalities.text.encoder={encoder}', '--json']\n"
        "result = CliRunner().invoke(app, args)\n"
        "assert result.exit_code == 0, result.output\n"
        "assert set(json.loads(result.output)) == {'ingest', 'encode', 'project', 'train', 'index'}\n"
        # status on a built work directory fingerprints every stage: code versions and external inputs
        "from clearrec.pipeline.config import load_config\n"
        "from clearrec.pipeline.registry import STAGES\n"
        "from clearrec.pipeline.runner import Runner\n"
        f"cfg = load_config({str(config)!r}, ['encode.modalities.text.encoder={encoder}'])\n"
        f"runner = Runner(STAGES, cfg, {str(work)!r})\n"
        "parts = {s.name: runner.fingerprint_parts(s) for s in STAGES}\n"
        f"assert {str(encoder / 'config.json')!r} in parts['encode']['external'], parts['encode']\n"
        "assert any(p.endswith('items.csv') for p in parts['ingest']['external']), parts['ingest']\n"
    )
    assert heavy_modules_after(code) == []


def test_registry_names_and_descriptions_are_the_specs():
    from clearrec.pipeline.registry import DESCRIPTIONS, STAGES, stage_names

    assert stage_names() == [s.name for s in STAGES]
    assert DESCRIPTIONS == {s.name: s.description for s in STAGES}


def test_query_help_bound_is_the_api_limit():
    from clearrec.pipeline import api
    from clearrec.pipeline.cli import query

    assert query.MAX_K == api.MAX_K


def test_code_version_hashes_the_source_inspect_reads_without_importing(tmp_path, monkeypatch):
    from clearrec import __version__

    (tmp_path / "clearrec_probe_run.py").write_text("def run(ctx):\n    return None")  # no final newline
    (tmp_path / "clearrec_probe_helper.py").write_text("# -*- coding: latin-1 -*-\r\nNAME = 'caf\xe9'\r\n",
                                                       encoding="latin-1")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = importlib.import_module("clearrec_probe_run").run
    spec = StageSpec(name="probe", run=run, code=("clearrec_probe_helper",))
    version = spec.code_version()
    assert "clearrec_probe_helper" not in sys.modules  # read, not imported
    helper = importlib.import_module("clearrec_probe_helper")
    expected = hashlib.sha256(__version__.encode())
    for module in (sys.modules[run.__module__], helper):
        expected.update(inspect.getsource(module).encode())
    assert version == f"{__version__}+{expected.hexdigest()[:16]}"
    assert module_source("clearrec_probe_helper") == inspect.getsource(helper)


def test_a_changed_source_file_changes_the_code_version(tmp_path, monkeypatch):
    (tmp_path / "clearrec_probe_edit.py").write_text("def run(ctx):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = StageSpec(name="probe", run=importlib.import_module("clearrec_probe_edit").run)
    before = spec.code_version()
    (tmp_path / "clearrec_probe_edit.py").write_text("def run(ctx):\n    return 1\n")
    monkeypatch.setattr(stage_module, "_CODE_VERSIONS", {})  # a new process
    assert spec.code_version() != before

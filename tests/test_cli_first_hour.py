"""The command line as a newcomer meets it: output for pipes, clear errors, help, query, serve, run summary.

The CLI runs in-process through its real entry point (``main``) or as ``python -m clearrec``, over
a tiny catalog of its own (40 items with titles, 60 users; the real MiniLM text encoder, no images,
LightGCN for 2 epochs).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from clearrec.pipeline.cli import app, main
from clearrec.pipeline.config import load_config
from clearrec.pipeline.errors import ConfigError
from clearrec.pipeline.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
WORDS = ["wooden", "train", "bottle", "blanket", "stroller", "teether", "rattle", "kite"]


def write_catalog(folder: Path, encoders: str) -> Path:
    """A 40-item, 60-user table catalog and its config; returns the config path."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        for i in range(40):
            w.writerow([f"I{i:03d}", f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} number {i}"])
    with open(folder / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id"])
        for u in range(60):
            for i in rng.choice(40, size=8, replace=False):
                w.writerow([f"U{u:03d}", f"I{i:03d}"])
    config = folder / "clearrec.toml"
    config.write_text(f'[encode]\n{encoders}\n\n[train]\nbackbone = "lightgcn"\nepochs = 2\nthreads = 1\n')
    return config


TEXT_ONLY = '[encode.modalities.text]\nencoder = "all-MiniLM-L6-v2"'
NO_ENCODERS = 'modalities = {}'


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``clearrec ARGS`` through the real entry point; (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["clearrec", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A work directory built by ``clearrec run``, with the run's console output."""
    root = tmp_path_factory.mktemp("first_hour")
    config = write_catalog(root / "data", TEXT_ONLY)
    work = root / "work"
    res = CliRunner().invoke(app, ["run", "--config", str(config), "--workdir", str(work)])
    assert res.exit_code == 0, res.output
    return config, work, res.output


# ---- 3: output for files and pipes ----------------------------------------------------------
def test_config_show_writes_valid_unwrapped_toml(tmp_path, capsys):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 3) / "and-another-one"
    config = write_catalog(deep, NO_ENCODERS)
    code, out, _ = cli(capsys, "config", "show", "--config", str(config))
    assert code == 0
    assert len(out.splitlines()[0]) > 100  # the comment line that used to be wrapped at 80 columns
    assert "\x1b[" not in out  # no styling
    assert tomllib.loads(out) == tomllib.loads(load_config(config).to_toml())


def test_compare_prints_its_markdown_table_unwrapped(tmp_path, capsys):
    config = write_catalog(tmp_path / "data", NO_ENCODERS)
    code, out, err = cli(capsys, "compare", "--config", str(config), "--workdir", str(tmp_path / "work"),
                         "--out", str(tmp_path / "exp"), "--backbones", "lightgcn", "--seeds", "0", "--epochs", "1")
    assert code == 0, err
    table = (tmp_path / "exp" / "compare.md").read_text(encoding="utf-8")
    assert max(len(line) for line in table.splitlines()) > 80
    assert table in out and "\x1b[" not in out


# ---- 4: a work directory that is a file, or that does not exist -----------------------------
def test_workdir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    config = write_catalog(tmp_path / "data", NO_ENCODERS)
    file = tmp_path / "work.txt"
    file.write_text("not a folder")
    for command in ("run", "status", "query", "report"):
        extra = ["--user", "U000"] if command == "query" else []
        code, out, err = cli(capsys, command, "--config", str(config), "--workdir", str(file), *extra)
        assert code == 1, (command, err)
        assert f"work directory {file} is a file" in err and "Traceback" not in err + out


def test_read_only_commands_create_nothing_and_say_the_folder_is_missing(tmp_path, capsys):
    config = write_catalog(tmp_path / "data", NO_ENCODERS)
    missing = tmp_path / "typo" / "wrok"
    for args in (["status"], ["status", "--json"], ["query", "--user", "U000"], ["serve"]):
        code, out, err = cli(capsys, args[0], "--config", str(config), "--workdir", str(missing), *args[1:])
        assert code == 1 and f"work directory {missing} does not exist" in err, (args, err)
        assert "never-run" not in out
    assert not (tmp_path / "typo").exists()


# ---- 5: --set errors ------------------------------------------------------------------------
def test_set_errors_name_the_override_and_suggest_only_close_keys(tmp_path, capsys):
    config = write_catalog(tmp_path / "data", NO_ENCODERS)
    with pytest.raises(ConfigError) as e:
        load_config(config, ["train.bogus=1"])
    assert "from --set train.bogus=1" in str(e.value) and str(config) not in str(e.value)
    assert "did you mean" not in str(e.value) and "known keys here: train.backbone" in str(e.value)
    with pytest.raises(ConfigError, match=r"did you mean 'train\.epochs'"):
        load_config(config, ["train.epoch=3"])
    with pytest.raises(ConfigError) as e:
        load_config(config, ["train.lr=fast"])
    assert "from --set train.lr=fast" in str(e.value) and str(config) not in str(e.value)
    config.write_text(config.read_text() + "lr = -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(config, ["train.epochs=many"])  # one error from each place
    assert re.search(rf"train\.lr: .*\[in {re.escape(str(config))}\]", str(e.value))
    assert re.search(r"train\.epochs: .*\[from --set train\.epochs=many\]", str(e.value))
    code, _, err = cli(capsys, "config", "show", "--config", str(config), "--set", "train.bogus=1")
    assert code == 2 and "from --set train.bogus=1" in err
    os.chdir(tmp_path)  # no clearrec.toml here: query with --workdir alone starts from the defaults
    try:
        code, _, err = cli(capsys, "query", "--workdir", str(tmp_path), "--user", "U0", "--set", "index.serve.port=x")
    finally:
        os.chdir(REPO)
    assert code == 2 and "[from --set index.serve.port=x]" in err


# ---- 6: --version, -h, flags and stage names in the help -------------------------------------
def _all_commands(cmd, prefix=()):
    """(name path, click command) of the group ``cmd`` and every command under it."""
    yield prefix, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _all_commands(sub, (*prefix, name))


def test_version_short_help_flag_metavars_and_stage_names(capsys):
    from clearrec import __version__

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"clearrec {__version__}"
    import typer.main

    for prefix, _cmd in _all_commands(typer.main.get_command(app)):
        code, out, _ = cli(capsys, *prefix, "-h")
        assert code == 0 and "Usage: " in out, prefix
        assert "<bool>" not in out, prefix
    code, out, _ = cli(capsys, "run", "-h")
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    for option in ("--only", "--from", "--to"):
        help_text = flat.split(option, 1)[1].split(" --", 1)[0]
        assert all(s in help_text for s in ("ingest", "encode", "project", "train", "index")), (option, help_text)


# ---- 7: query usage errors --------------------------------------------------------------------
def test_query_usage_errors_come_before_loading(tmp_path, capsys):
    nowhere = ["--workdir", str(tmp_path / "absent")]  # a usage error must not even look at the folder
    code, _, err = cli(capsys, "query", *nowhere, "--user", "U000", "--source", "cf")
    assert code == 2 and "--source applies to --item only" in err
    code, _, err = cli(capsys, "query", *nowhere, "--item", "I000", "--source", "bogus")
    assert code == 2 and "'bogus' is not one of content, cf" in err
    code, _, err = cli(capsys, "query", *nowhere, "--text", "")
    assert code == 2 and "search text is empty" in err and "search_text" not in err
    assert not (tmp_path / "absent").exists()


def test_query_unknown_user_suggests_the_id_in_its_case(built, capsys):
    config, work, _ = built
    code, _, err = cli(capsys, "query", "--config", str(config), "--workdir", str(work), "--user", "u001")
    assert code == 1 and "unknown user 'u001'" in err and "did you mean 'U001'?" in err
    code, out, err = cli(capsys, "query", "--config", str(config), "--workdir", str(work), "--item", "I001",
                         "--source", "cf", "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 20


# ---- 8: serve says "serving" when it answers ------------------------------------------------------
@pytest.mark.slow
def test_serve_says_serving_only_once_it_answers(built, tmp_path):
    config, work, _ = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clearrec", "serve", "--config", str(config), "--workdir",
                             str(work), "--port", str(port)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, cwd=tmp_path)
    try:
        lines = []
        for line in proc.stderr:  # blocks until the server prints
            lines.append(line)
            if "serving" in line:
                break
        assert any(f"on http://127.0.0.1:{port}" in line for line in lines), lines
        # no retry: it must answer the moment it says so (the text encoder may still be loading)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/recommend/U001?k=3", timeout=30).json()["results"]
        hits = httpx.post(f"http://127.0.0.1:{port}/search", json={"text": "wooden kite", "k": 3}, timeout=120)
        assert hits.status_code == 200 and len(hits.json()["results"]) == 3  # waits for the encoder
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- 9: the closing summary and third-party noise --------------------------------------------
def test_run_ends_with_a_summary_whose_commands_work(built, capsys):
    config, work, output = built
    block = output[output.index(f"Built in {work}:"):]
    for stage, artifact in (("ingest", "items.parquet"), ("encode", "features/text.parquet"),
                            ("train", "model/metrics.json"), ("index", "index/index_info.json")):
        assert re.search(rf"^  {stage} .*{re.escape(artifact)}", block, re.M), (stage, block)
    test = json.loads((work / "model" / "metrics.json").read_text())["test"]
    assert f"recall@20 {test['recall@20']:.4f}" in block and f"ndcg@20 {test['ndcg@20']:.4f}" in block
    commands = [line.strip().split("   #")[0] for line in block.splitlines() if line.startswith("  clearrec ")]
    assert [shlex.split(c)[1] for c in commands] == ["query", "serve", "report", "compare"]
    for c in commands[:1] + commands[2:3]:  # query and report, as printed
        code, out, err = cli(capsys, *shlex.split(c)[1:])
        assert code == 0, (c, err)
    assert (work / "report.html").is_file()


def test_third_party_log_records_go_to_the_run_log_not_the_console(tmp_path, capsys):
    from clearrec.pipeline.cli.common import library_logs_to

    log = tmp_path / "work" / "clearrec.log"
    with library_logs_to(log):
        logging.warning("No pretrained weights loaded for model 'ViT-S-32'.")  # how open_clip says it
        logging.getLogger("transformers.modeling_utils").warning("some weights were not used")
    err = capsys.readouterr().err
    assert "No pretrained weights" not in err and "not used" not in err
    text = log.read_text()
    assert "WARNING root: No pretrained weights" in text and "transformers.modeling_utils: some weights" in text
    logging.getLogger("clearrec.test").warning("after the run")  # handlers are restored on exit
    assert "after the run" not in log.read_text()


def test_run_writes_the_run_log_and_shows_no_hugging_face_bars(built):
    _, work, output = built
    assert (work / "clearrec.log").is_file()
    assert "Loading weights" not in output and "WARNING:" not in output
    probe = ("import os, clearrec.pipeline.cli\n"
             "from transformers.utils import logging as tl\n"
             "print(os.environ['HF_HUB_DISABLE_PROGRESS_BARS'], tl.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.split()[-2:] == ["1", "False"]


# ---- 10: commands in the README and the report are copy-pasteable ------------------------------
def test_report_not_run_commands_work_as_printed(tmp_path, capsys):
    config = write_catalog(tmp_path / "data", NO_ENCODERS)
    work = tmp_path / "work"
    code, _, err = cli(capsys, "run", "--config", str(config), "--workdir", str(work), "--only", "ingest")
    assert code == 0, err
    code, _, err = cli(capsys, "report", "--workdir", str(work))
    assert code == 0, err
    md = (work / "report.md").read_text(encoding="utf-8")
    commands = list(dict.fromkeys(re.findall(r"not run: .*?`(clearrec [^`]+)`", md)))
    assert commands, md
    for c in commands:
        code, _, err = cli(capsys, *shlex.split(c)[1:])
        assert code == 0, (c, err)
    assert (work / "index" / "index_info.json").is_file()


def _readme_commands() -> list[str]:
    """Every ``clearrec ...`` command in the README's shell code blocks (synopses with [...] left out)."""
    out, fence = [], None
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence not in ("bash", "console", "sh", ""):
            continue
        for part in line.strip().removeprefix("$ ").split("&&"):
            part = re.sub(r"^(\S+/)?\.venv/bin/", "", part.strip()).split(" # ")[0].split("  #")[0].strip()
            if part.startswith("clearrec ") and "[" not in part and " | " not in part:
                out.append(part)
    return out


def test_readme_commands_parse_and_name_their_config_and_workdir():
    import click
    import typer.main

    commands = _readme_commands()
    assert len(commands) >= 15
    for line in commands:
        args = shlex.split(line)[1:]
        cmd, name = typer.main.get_command(app), "clearrec"
        while isinstance(cmd, click.Group):  # clearrec [group] command options...
            name, args = args[0], args[1:]
            assert name in cmd.commands, line
            cmd = cmd.commands[name]
        cmd.make_context(name, list(args))  # raises on an unknown option or a bad value
        if name in ("run", "status", "ingest", "encode", "project", "train", "index", "compare", "ablate", "sweep"):
            assert "--config" in args and "--workdir" in args, line
        if name in ("show",):
            assert "--config" in args, line
        if name in ("query", "serve"):
            assert "--workdir" in args, line
        if name == "report":
            assert "--workdir" in args or "--comparison" in args, line


# ---- 11: one permission rule for every artifact -------------------------------------------------
def test_every_artifact_gets_the_same_permissions(built, tmp_path):
    _, work, _ = built
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777
    store = ArtifactStore(tmp_path / "store")
    written = [store.write_tensors("t.safetensors", {"x": np.zeros(3, dtype=np.float32)}), store.write_json("a.json", {})]
    built_files = [p for p in work.rglob("*") if p.is_file() and p.name not in (".lock", "clearrec.log")]
    assert any(p.suffix == ".safetensors" for p in built_files)
    modes = {str(p.relative_to(work)): oct(p.stat().st_mode & 0o777) for p in built_files}
    assert set(modes.values()) == {oct(expected)}, modes
    assert {p.stat().st_mode & 0o777 for p in written} == {expected}

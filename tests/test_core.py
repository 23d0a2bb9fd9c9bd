"""The core: runner (fingerprints, skip / rerun, selection, dry run, failures), store atomicity, config errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

from clearrec.pipeline.config import load_config
from clearrec.pipeline.errors import ClearrecError, ConfigError, InputDataError, StageError
from clearrec.pipeline.runner import Runner, select_stages
from clearrec.pipeline.stage import StageResult, StageSpec
from clearrec.pipeline.store import ArtifactStore

CALLS: list[str] = []


def _source_a(ctx):
    CALLS.append("a")
    text = f"lr={ctx.config.get('train.lr')} src={Path(ctx.config.resolve('raw.txt')).read_text()}"
    ctx.store.write_text("a.txt", text)
    return StageResult(outputs=["a.txt"], counts={"rows": 1}, summary="wrote a.txt")


def _derived_b(ctx):
    CALLS.append("b")
    if ctx.config.get("train.epochs") == 13:
        raise InputDataError("epochs = 13 is unlucky; set train.epochs to anything else")
    ctx.store.write_text("b.txt", ctx.store.path("a.txt").read_text().upper())
    return StageResult(outputs=["b.txt"])


def _derived_c(ctx):
    CALLS.append("c")
    ctx.store.write_text("c.txt", ctx.store.path("b.txt").read_text()[::-1])
    return StageResult(outputs=["c.txt"])


A = StageSpec(name="alpha", run=_source_a, outputs=("a.txt",), config_keys=("train.lr",),
              external_inputs=lambda cfg: [cfg.resolve("raw.txt")])
B = StageSpec(name="beta", run=_derived_b, inputs=("a.txt",), outputs=("b.txt",), config_keys=("train.epochs",))
C = StageSpec(name="gamma", run=_derived_c, inputs=("b.txt",), outputs=("c.txt",))
STAGES = (A, B, C)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "raw.txt").write_text("hello")
    (tmp_path / "clearrec.toml").write_text(tomli_w.dumps({"train": {"lr": 0.01, "epochs": 5}}))
    CALLS.clear()
    return tmp_path


def make_runner(root: Path, *overrides: str) -> tuple[Runner, io.StringIO]:
    log = io.StringIO()
    cfg = load_config(root / "clearrec.toml", list(overrides))
    return Runner(STAGES, cfg, root / "work", console=Console(file=log, width=300)), log


# ---- fingerprints: skip and rerun ---------------------------------------------------------------
def test_second_run_skips_everything(project):
    runner, _ = make_runner(project)
    assert runner.run() == ["alpha", "beta", "gamma"]
    runner, log = make_runner(project)
    assert runner.run() == [] and CALLS == ["a", "b", "c"]
    assert "Nothing to do" in log.getvalue()
    assert {s.state for s in runner.status().values()} == {"up-to-date"}
    entry = json.loads((project / "work" / "manifest.json").read_text())["stages"]["alpha"]
    assert entry["status"] == "ok" and entry["counts"] == {"rows": 1} and entry["outputs"]["a.txt"]["bytes"] > 0


def test_config_key_change_reruns_the_stage_and_what_its_output_feeds(project):
    make_runner(project)[0].run()
    runner, _ = make_runner(project, "train.lr=0.5")
    status = runner.status()
    assert status["alpha"].reason == "config changed: train.lr"
    assert status["beta"].reason == "upstream stage 'alpha' is stale"
    CALLS.clear()
    assert runner.run() == ["alpha", "beta", "gamma"]
    runner, _ = make_runner(project, "train.lr=0.5", "train.batch_size=7")  # a key no stage reads
    assert runner.run() == []


def test_unchanged_upstream_output_does_not_rerun_downstream(project):
    make_runner(project)[0].run()
    runner, _ = make_runner(project, "train.epochs=6")
    assert runner.run() == ["beta"]  # b's output is unchanged, so gamma's inputs are too


def test_external_input_change_makes_the_stage_stale(project):
    make_runner(project)[0].run()
    (project / "raw.txt").write_text("changed")
    runner, _ = make_runner(project)
    assert runner.status()["alpha"].reason == f"source file changed: {project / 'raw.txt'}"
    assert runner.run() == ["alpha", "beta", "gamma"]


def test_modified_output_makes_the_stage_stale_and_force_reruns(project):
    runner, _ = make_runner(project)
    runner.run()
    (project / "work" / "b.txt").write_text("tampered")
    assert runner.status()["beta"].reason == "output b.txt was modified"
    assert runner.status()["gamma"].reason == "upstream stage 'beta' is stale"
    assert runner.run() == ["beta"]  # rewrites the same content, so gamma stays up to date
    (project / "work" / "c.txt").unlink()
    assert runner.status()["gamma"].reason == "output c.txt is missing"
    assert runner.run(force=True) == ["alpha", "beta", "gamma"]


# ---- selection -------------------------------------------------------------------------------
def test_select_only_from_to():
    names = lambda stages: [s.name for s in stages]  # noqa: E731
    assert names(select_stages(STAGES, only=["gamma", "alpha"])) == ["alpha", "gamma"]
    assert names(select_stages(STAGES, only=["alpha,beta"])) == ["alpha", "beta"]
    assert names(select_stages(STAGES, from_="beta")) == ["beta", "gamma"]
    assert names(select_stages(STAGES, to="beta")) == ["alpha", "beta"]
    assert names(select_stages(STAGES, from_="beta", to="beta")) == ["beta"]
    with pytest.raises(ConfigError, match="unknown stage 'betta'; did you mean 'beta'"):
        select_stages(STAGES, only=["betta"])
    with pytest.raises(ConfigError, match="did you mean 'gamma'"):
        select_stages(STAGES, from_="gama")
    with pytest.raises(ConfigError, match="cannot be combined"):
        select_stages(STAGES, only=["alpha"], to="beta")
    with pytest.raises(ConfigError, match="comes after"):
        select_stages(STAGES, from_="gamma", to="alpha")


def test_cli_unknown_stage_gets_did_you_mean(tmp_path):
    from typer.testing import CliRunner

    from clearrec.pipeline.cli.main import app

    (tmp_path / "clearrec.toml").write_text("")
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "clearrec.toml"), "--only", "ingset"])
    assert isinstance(result.exception, ConfigError) and "did you mean 'ingest'" in str(result.exception)


_THP_PROBE = """
import os, sys
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.setdefault("torch", os.environ.get("THP_MEM_ALLOC_ENABLE"))
sys.meta_path.insert(0, Probe())
import clearrec.pipeline.cli
from clearrec.stages import train
train.torch.zeros(1)  # torch is imported when a stage first uses it
print(seen.get("torch"), os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("exported", "expected"), [(None, "1 1"), ("0", "0 0")])
def test_cli_enables_huge_pages_before_torch_loads_unless_exported(exported, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if exported is not None:
        env["THP_MEM_ALLOC_ENABLE"] = exported
    out = subprocess.run([sys.executable, "-c", _THP_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == expected.split()


def test_dry_run_runs_nothing(project):
    runner, log = make_runner(project)
    assert runner.run(dry_run=True) == ["alpha", "beta", "gamma"]
    assert CALLS == [] and not (project / "work" / "manifest.json").exists()
    assert "would run alpha" in log.getvalue()


# ---- failures -------------------------------------------------------------------------------
def test_failure_is_recorded_and_prints_the_resume_command(project):
    runner, log = make_runner(project, "train.epochs=13")
    with pytest.raises(StageError, match="stage 'beta' failed: epochs = 13 is unlucky") as e:
        runner.run(resume_hint="clearrec run --config x.toml")
    assert isinstance(e.value.__cause__, InputDataError)
    assert CALLS == ["a", "b"]  # gamma never started
    assert "resume with: clearrec run --config x.toml --from beta" in log.getvalue()
    entry = json.loads((project / "work" / "manifest.json").read_text())["stages"]["beta"]
    assert entry["status"] == "failed" and "unlucky" in entry["error"]
    assert runner.status()["beta"].reason.startswith("last run failed: epochs = 13")
    runner, _ = make_runner(project)
    CALLS.clear()
    assert runner.run(select_stages(STAGES, from_="beta")) == ["beta", "gamma"]


def test_a_second_runner_on_the_same_workdir_is_refused(project):
    runner, _ = make_runner(project)
    other, _ = make_runner(project)
    with runner._lock():
        with pytest.raises(ClearrecError, match="another clearrec run is using"):
            other.run()


# ---- store -------------------------------------------------------------------------------------
def test_code_version_is_fixed_for_the_process_even_if_the_source_changes(tmp_path, monkeypatch):
    import importlib

    (tmp_path / "clearrec_probe_stage.py").write_text("def run(ctx):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("clearrec_probe_stage")
    spec = StageSpec(name="probe", run=module.run)
    before = spec.code_version()
    (tmp_path / "clearrec_probe_stage.py").write_text("")  # edited (here: emptied) during a run
    assert spec.code_version() == before


def test_thread_scopes_restore_the_previous_count_and_zero_changes_nothing():
    import faiss
    import torch

    from clearrec.pipeline.threads import omp_threads, torch_threads

    for scope, get in ((torch_threads, torch.get_num_threads), (omp_threads, faiss.omp_get_max_threads)):
        before = get()
        with scope(1):
            assert get() == 1
        assert get() == before
        with scope(0):
            assert get() == before
        with pytest.raises(RuntimeError), scope(1):
            raise RuntimeError("stage failed")
        assert get() == before


def test_failed_atomic_write_keeps_the_previous_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write_text("x/a.txt", "old")
    with pytest.raises(RuntimeError, match="crash"):
        with store.atomic("x/a.txt") as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash mid-write")
    assert store.path("x/a.txt").read_text() == "old"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["a.txt"]  # no temp file left behind
    store.write_text("x/a.txt", "new")
    assert store.path("x/a.txt").read_text() == "new"


def test_store_refuses_names_outside_the_workdir(tmp_path):
    from clearrec.pipeline.errors import ArtifactError

    store = ArtifactStore(tmp_path)
    for name in ("../escape.txt", "/etc/passwd", ""):
        with pytest.raises(ArtifactError):
            store.path(name)


def test_artifacts_are_readable_by_others(tmp_path):
    store = ArtifactStore(tmp_path)
    mode = store.write_text("a.txt", "x").stat().st_mode & 0o777
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    assert mode == reference.stat().st_mode & 0o777  # same as a plainly created file, not mkstemp's 0600


# ---- config errors -------------------------------------------------------------------------------
def test_unknown_config_key_gets_did_you_mean(tmp_path):
    path = tmp_path / "clearrec.toml"
    path.write_text('[ingest]\nkcor = 5\n')
    with pytest.raises(ConfigError, match="unknown config key 'ingest.kcor'.*did you mean 'ingest.kcore'"):
        load_config(path)
    path.write_text('[ingst]\nkcore = 5\n')
    with pytest.raises(ConfigError, match="did you mean 'ingest'"):
        load_config(path)
    path.write_text("")
    with pytest.raises(ConfigError, match="did you mean 'ingest.seed'"):
        load_config(path, ["ingest.sed=3"])


def test_bad_config_values_name_the_key(tmp_path):
    path = tmp_path / "clearrec.toml"
    path.write_text('[ingest]\nkcore = -1\nsplit = "randm"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "ingest.kcore" in str(e.value) and "ingest.split" in str(e.value) and str(path) in str(e.value)
    path.write_text("")
    with pytest.raises(ConfigError, match="split_ratios must be non-negative and sum to 1"):
        load_config(path, ["ingest.split_ratios=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match="the train share"):
        load_config(path, ["ingest.split_ratios=[0.0, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match="unknown text encoding 'utf-9'"):
        load_config(path, ["ingest.encoding=utf-9"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["ingest.kcore"])
    path.write_text("[ingest\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_config_resolves_paths_against_its_folder_and_overrides_parse_as_toml(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "clearrec.toml"
    path.write_text('[ingest]\nitems = "data/items.csv"\n')
    cfg = load_config(path, ["ingest.seed=7", "ingest.split=temporal", "ingest.min_rating=3.5"])
    assert cfg.resolve(cfg.ingest.items) == (tmp_path / "sub" / "data" / "items.csv").resolve()
    assert (cfg.ingest.seed, cfg.ingest.split, cfg.ingest.min_rating) == (7, "temporal", 3.5)
    assert cfg.with_overrides({"ingest.kcore": 3}).get("ingest.kcore") == 3


def test_a_stage_reads_only_the_config_keys_it_declares(project):
    def sneaky(ctx):
        ctx.config.get("train.lr")  # declared: fine
        ctx.config.train.epochs  # not declared: its value would not be in the fingerprint
        return StageResult(outputs=[])

    spec = StageSpec(name="alpha", run=sneaky, config_keys=("train.lr",))
    runner, log = make_runner(project)
    with pytest.raises(StageError, match="reads config key 'train.epochs', which it does not declare"):
        runner.run([spec])
    view = runner.config.view(("train", "project.k"), "x")
    assert view.train.lr == 0.01 and view.project.k == 8 and view.resolve("raw.txt") == project / "raw.txt"
    with pytest.raises(ConfigError, match="'project.seed'"):
        view.project.seed
    with pytest.raises(ConfigError, match="'index'"):
        view.get("index.factory")


def test_dry_run_never_says_skipped_downstream_of_a_stage_that_will_run(project):
    make_runner(project)[0].run()
    runner, log = make_runner(project, "train.lr=0.5")
    assert runner.run(dry_run=True) == ["alpha", "beta", "gamma"]
    text = log.getvalue()
    assert "would run alpha" in text and "skipped" not in text
    assert "may run   beta" in text and "checked after alpha runs: reruns if a.txt change" in text
    assert "may run   gamma" in text and "checked after beta runs" in text
    assert CALLS == ["a", "b", "c"]  # the first, real run only

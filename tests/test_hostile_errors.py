"""Clear errors instead of crashes: FAISS factory strings, strict config values, messages kept verbatim."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys

import pytest
import tomli_w
from rich.console import Console

from clearrec.models import ann
from clearrec.pipeline.config import Config, load_config
from clearrec.pipeline.errors import ConfigError, InputDataError, StageError
from clearrec.pipeline.runner import Runner
from clearrec.pipeline.stage import StageContext, StageResult, StageSpec
from clearrec.pipeline.store import ArtifactStore

# ---- FAISS factory strings ------------------------------------------------------------------
# each of these aborts, crashes or hangs the process inside FAISS, or fails with a message
# that does not say what is wrong (checked on faiss 1.x: HNSW0/HNSW1/RR0 segfault or abort,
# PQ4x0 and OPQ4_0 die of a floating-point exception, NSG1 never returns)
CRASHERS = ["HNSW0", "HNSW1", "IVF0,Flat", "PQ4x0", "RR0,Flat", "OPQ4_0,PQ4", "NSG1", "IVF4_HNSW0,Flat",
            "HNSW99999999999", "IVF4", "Flat,Flat", "IVF-1,Flat", ""]


@pytest.mark.parametrize("factory", CRASHERS)
def test_bad_factory_strings_are_config_errors_naming_the_part(factory):
    with pytest.raises(ConfigError, match="index.factory: .*index factory"):
        Config().with_overrides({"index.factory": factory})


@pytest.fixture
def one_omp_thread():
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("factory", ["IVF4096,PQ32", "OPQ16_64,IVF1024,PQ16", "HNSW32,PQ16x4", "IVF256,PQ16x4fs,RFlat"])
def test_supported_factory_strings_pass(factory):
    assert Config().with_overrides({"index.factory": factory}).index.factory == factory


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "HNSW16,Flat", "HNSW32_SQ8", "IVF16,Flat", "IVF16,PQ8x4fs",
                                     "IVF16_HNSW32,SQ8", "PCAR16,IVF16,Flat", "L2norm,Flat", "IVF16,Flat,RFlat",
                                     "SQfp16"])
def test_supported_factory_strings_pass_and_build(factory, one_omp_thread):
    import numpy as np

    assert Config().with_overrides({"index.factory": factory}).index.factory == factory
    x = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)
    assert ann.build_index(x, factory).ntotal == 300


@pytest.mark.parametrize("factory, d, n, says", [
    ("PQ5", 32, 1000, "multiple of 5"), ("PCA64,Flat", 32, 1000, "more than the 32"),
    ("IVF1024,Flat", 32, 100, "at least 1024 vectors"), ("PQ4", 32, 100, "only 100 vectors"),
    ("IVF16,PQ4x8fs", 32, 1000, "4 bits"),
])
def test_factory_checks_that_need_the_data(factory, d, n, says, one_omp_thread):
    import numpy as np

    with pytest.raises(ValueError, match=says):
        ann.build_index(np.zeros((n, d), np.float32), factory)


def test_build_index_refuses_a_crashing_factory_without_killing_the_process():
    code = ("import faiss, numpy as np; from clearrec.models import ann; faiss.omp_set_num_threads(1)\n"
            "try:\n    ann.build_index(np.random.rand(300, 16).astype('float32'), 'HNSW0')\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "refused: index factory 'HNSW0': M = 0" in done.stdout


# ---- strict config values -------------------------------------------------------------------
@pytest.mark.parametrize("key, value, says", [
    ("project.k", "8", "valid integer"), ("encode.normalize", "yes", "valid boolean"),
    ("train.epochs", True, "valid integer"), ("train.lr", float("inf"), "finite number"),
    ("encode.http_timeout_s", float("inf"), "finite number"), ("train.lr", float("nan"), "finite number"),
    ("ingest.min_rating", float("-inf"), "finite number"), ("index.serve.port", 80.0, "valid integer"),
    ("train.eval_ks", [5, "10", 20], "valid integer"), ("ingest.split_ratios", [0.8, float("nan"), 0.1], "finite"),
    ("project.k", 10**30, "less than or equal"), ("train.seed", -1, "greater than or equal"),
    ("encode.http_timeout_s", 1e300, "less than or equal"), ("train.epochs", 10**12, "less than or equal"),
    ("index.serve.max_body_bytes", 2**62, "less than or equal"), ("encode.batch_size", 1.5, "valid integer"),
])
def test_config_values_are_not_coerced_and_are_bounded(key, value, says):
    with pytest.raises(ConfigError, match=f"{key.split('.', 1)[1] if key.count('.') > 1 else key}.*{says}"):
        Config().with_overrides({key: value})


def test_config_file_with_coerced_values_names_each_key(tmp_path):
    path = tmp_path / "clearrec.toml"
    path.write_text('[project]\nk = "8"\n[train]\nepochs = true\nlr = inf\n[encode]\nhttp_timeout_s = inf\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    for key in ("project.k", "train.epochs", "train.lr", "encode.http_timeout_s"):
        assert key in text


def test_integers_for_floats_and_arrays_for_tuples_still_load(tmp_path):
    path = tmp_path / "clearrec.toml"
    path.write_text(tomli_w.dumps({"encode": {"http_timeout_s": 3}, "train": {"eval_ks": [10, 20], "lr": 1},
                                   "ingest": {"split_ratios": [0.8, 0.1, 0.1]}}))
    cfg = load_config(path, ["train.stop_metric=recall@10"])
    assert cfg.encode.http_timeout_s == 3.0 and cfg.train.eval_ks == (10, 20) and cfg.train.lr == 1.0
    assert cfg.with_overrides({"train.patience": 3}).train.eval_ks == (10, 20)  # round trip through JSON


# ---- messages keep their text (no console markup) ---------------------------------------------
def test_cli_config_error_keeps_bracketed_names(tmp_path, capsys, monkeypatch):
    cli = importlib.import_module("clearrec.pipeline.cli.main")

    (tmp_path / "clearrec.toml").write_text("ingest = 5\n")
    monkeypatch.setattr(sys, "argv", ["clearrec", "status", "--config", str(tmp_path / "clearrec.toml")])
    with pytest.raises(SystemExit):
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert "must be a table ([ingest])" in err


def test_cli_error_keeps_markup_like_text(tmp_path, capsys, monkeypatch):
    cli = importlib.import_module("clearrec.pipeline.cli.main")

    def fail(*args, **kwargs):
        raise InputDataError("point [ingest] items at the right file; [bold]x[/bold] [/]")

    monkeypatch.setattr(cli, "load", fail)
    monkeypatch.setattr(sys, "argv", ["clearrec", "status"])
    with pytest.raises(SystemExit):
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert "point [ingest] items at the right file; [bold]x[/bold] [/]" in err


def test_stage_log_and_runner_messages_print_text_verbatim(tmp_path):
    def noisy(ctx: StageContext) -> StageResult:
        ctx.log("reading [ingest] items from /data/[2024]/items.csv")
        ctx.warn("encoder [red]x[/red] is untrained")
        raise InputDataError("column [title] is missing; [/] set [ingest.columns] title")

    spec = StageSpec(name="noisy", run=noisy, outputs=("x.txt",))
    log = io.StringIO()
    runner = Runner((spec,), Config(), tmp_path / "work", console=Console(file=log, width=300))
    with pytest.raises(StageError):
        runner.run(resume_hint="clearrec run --config /cfg/[a].toml")
    text = log.getvalue()
    assert "reading [ingest] items from /data/[2024]/items.csv" in text
    assert "warning: encoder [red]x[/red] is untrained" in text
    assert "column [title] is missing; [/] set [ingest.columns] title" in text
    assert "clearrec run --config /cfg/[a].toml --from noisy" in text


def test_stage_summary_keeps_brackets(tmp_path):
    def ok(ctx: StageContext) -> StageResult:
        ArtifactStore(ctx.store.root).write_text("x.txt", "x")
        return StageResult(outputs=["x.txt"], summary="3 items from [shop] catalog")

    log = io.StringIO()
    Runner((StageSpec(name="ok", run=ok, outputs=("x.txt",)),), Config(), tmp_path / "work",
           console=Console(file=log, width=300)).run()
    assert "3 items from [shop] catalog" in log.getvalue()

"""An interrupted training run resumes from its last epoch and ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
from clearrec.models.trainer import TrainOptions, fit, run_key
from clearrec.stages import _train_checkpoint as checkpoint

from test_models import _make, _splits
from test_train_stage import config, run, write_workdir

OPTIONS = TrainOptions(lr=0.01, batch_size=64, epochs=6, patience=3, ks=(5, 10, 20), seed=3)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(Exception):
    pass


def _kill_after(n: int):
    def on_epoch(record):
        if record.epoch == n:
            raise Killed
    return on_epoch


def _train(name, ckpt=None, on_epoch=None, options=OPTIONS):
    (train, valid, test), edge_index = _splits()
    torch.manual_seed(0)
    model = _make(name, edge_index)
    if ckpt is None:
        return model, fit(model, train, valid, test, options, on_epoch)
    key = run_key(model, train, valid, options)  # as the train stage does: key, load, save every epoch
    return model, fit(model, train, valid, test, options, on_epoch, resume=checkpoint.load(ckpt, key),
                      on_state=lambda state: checkpoint.save(ckpt, key, state))


def _same(a, b):
    model_a, result_a = a
    model_b, result_b = b
    assert result_a.best_epoch == result_b.best_epoch
    assert result_a.valid == result_b.valid and result_a.test == result_b.test
    assert [(r.epoch, r.loss, r.valid) for r in result_a.history] == [(r.epoch, r.loss, r.valid) for r in result_b.history]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k


@pytest.mark.parametrize("name", ["lightgcn", "vbpr", "freedom"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, name):
    reference = _train(name)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _train(name, ckpt, _kill_after(3))
    assert json.loads((ckpt / "checkpoint.json").read_text())["epoch"] == 3
    resumed = _train(name, ckpt)
    assert resumed[1].resumed_from == 3
    _same(reference, resumed)


def test_repeated_kills_up_to_the_early_stop_still_match(tmp_path):
    options = TrainOptions(lr=0.002, batch_size=64, epochs=40, patience=3, ks=(5, 10, 20), seed=5)
    reference = _train("lightgcn", options=options)
    assert reference[1].stopped_early and len(reference[1].history) == 5
    ckpt = tmp_path / "ckpt"
    for n in (1, 3, 5):  # the last kill comes after the early stop: only the test evaluation is left
        with pytest.raises(Killed):
            _train("lightgcn", ckpt, _kill_after(n), options=options)
    resumed = _train("lightgcn", ckpt, options=options)
    assert resumed[1].resumed_from == 5 and resumed[1].stopped_early
    _same(reference, resumed)


def test_one_checkpoint_on_disk_safetensors_and_json_only(tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _train("freedom", ckpt, _kill_after(4))
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.json", "epoch-4.safetensors"]
    with open(ckpt / "epoch-4.safetensors", "rb") as f:
        assert b"\x80\x04" not in f.read(2)  # not a pickle


def test_checkpoint_of_other_settings_or_corrupt_is_not_used(tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _train("lightgcn", ckpt, _kill_after(2))
    other = TrainOptions(lr=0.02, batch_size=64, epochs=6, patience=3, ks=(5, 10, 20), seed=3)
    assert _train("lightgcn", ckpt, options=other)[1].resumed_from == 0
    with pytest.raises(Killed):
        _train("lightgcn", ckpt, _kill_after(2))
    tensors = ckpt / "epoch-2.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    reference, fresh = _train("lightgcn"), _train("lightgcn", ckpt)
    assert fresh[1].resumed_from == 0
    _same(reference, fresh)


def test_train_stage_resumes_and_removes_its_checkpoint(tmp_path, monkeypatch):
    store = write_workdir(tmp_path)
    cfg = config(**{"train.epochs": 5, "train.patience": 5, "train.backbone": "freedom"})
    run(store, cfg)
    reference = {k: store.read_json("model/metrics.json")[k] for k in ("valid", "test", "best_epoch")}
    reference_tensors, _ = store.read_tensors("model/model.safetensors")
    assert not store.path("cache/train_checkpoint").exists()

    import clearrec.models.trainer as trainer

    real_fit = trainer.fit

    def killed_fit(*args, **kwargs):
        def stop(record):
            if record.epoch == 2:
                raise Killed
        return real_fit(*args[:5], stop, **kwargs)

    monkeypatch.setattr(trainer, "fit", killed_fit)  # the stage calls trainer.fit
    with pytest.raises(Killed):
        run(store, cfg)
    assert store.path("cache/train_checkpoint/checkpoint.json").is_file()
    monkeypatch.setattr(trainer, "fit", real_fit)
    result, _ = run(store, cfg)
    assert result.counts["resumed_from_epoch"] == 2
    assert {k: store.read_json("model/metrics.json")[k] for k in ("valid", "test", "best_epoch")} == reference
    tensors, _ = store.read_tensors("model/model.safetensors")
    assert tensors.keys() == reference_tensors.keys()
    assert all((tensors[k] == reference_tensors[k]).all() for k in tensors)
    assert not store.path("cache/train_checkpoint").exists()


def test_learning_rate_decays_per_epoch_and_a_resumed_run_keeps_the_schedule(tmp_path):
    options = TrainOptions(lr=0.01, lr_decay=0.5, lr_decay_epochs=2, batch_size=64, epochs=5, patience=5,
                           ks=(5, 10, 20), seed=3)
    (train, valid, test), edge_index = _splits()
    torch.manual_seed(0)
    lrs = []
    fit(_make("lightgcn", edge_index), train, valid, test, options,
        on_state=lambda state: lrs.append(state.optimizer["param_groups"][0]["lr"]))
    assert lrs == pytest.approx([0.01 * 0.5 ** ((e - 1) / 2) for e in range(1, 6)], rel=1e-12)
    reference = _train("lightgcn", options=options)
    constant = _train("lightgcn", options=TrainOptions(**{**options.__dict__, "lr_decay": 1.0}))
    assert reference[1].history[-1].loss != constant[1].history[-1].loss  # the schedule changes training
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _train("lightgcn", ckpt, _kill_after(2), options=options)
    _same(reference, _train("lightgcn", ckpt, options=options))

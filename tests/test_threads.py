"""The thread count for a shared machine: the CPUs other processes leave free, measured again after each epoch."""

from __future__ import annotations

import pytest
import torch
from clearrec.pipeline.threads import ThreadGovernor, _cpu_ticks, _scoped

from test_train_stage import config, run, write_workdir


class Ticks:
    """A fake /proc: each ``advance`` adds an interval of ``per_cpu`` ticks on ``cpus`` CPUs."""

    def __init__(self):
        self.busy = self.total = self.own = 0

    def __call__(self):
        return self.busy, self.total, self.own

    def advance(self, others: float, own: float, cpus: int = 2, per_cpu: int = 100):
        self.busy += int((others + own) * per_cpu)
        self.total += cpus * per_cpu
        self.own += int(own * per_cpu)


def governor(ticks, cpus=2, limit=None):
    calls = []
    return ThreadGovernor(calls.append, limit=limit, sample_s=0, ticks=ticks, cpus=cpus), calls


@pytest.mark.parametrize(("others", "own", "expected"), [
    (0.0, 0.0, 2),  # quiet machine: every CPU
    (0.1, 1.9, 2),  # our own load is not the others'
    (1.0, 0.0, 1),  # another process keeps one of the two cores busy
    (0.9, 1.1, 1),  # ... also while we share it with that process
    (2.0, 0.0, 1),  # at least one
])
def test_threads_are_the_cpus_other_processes_leave_free(monkeypatch, others, own, expected):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    ticks = Ticks()
    gov, calls = governor(ticks)
    ticks.advance(others, own)
    assert gov.update() == expected and calls == [expected]


def test_count_follows_the_load_and_is_set_only_when_it_changes(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    ticks = Ticks()
    gov, calls = governor(ticks, cpus=4, limit=3)
    for others in (0.0, 0.0, 2.0, 2.2, 0.3):
        ticks.advance(others, 1.0, cpus=4)
        gov.update()
    assert calls == [3, 2, 3]  # capped at the limit; unchanged counts are not set again


def test_without_proc_nothing_is_changed():
    gov, calls = governor(lambda: None)
    assert gov.update() is None and calls == []


def test_reads_this_machine():
    ticks = _cpu_ticks()
    if ticks is None:
        pytest.skip("no /proc on this system")
    busy, total, own = ticks
    assert 0 <= busy <= total and own >= 0


def test_train_stage_default_is_adaptive_and_restores_torch(tmp_path):
    store = write_workdir(tmp_path)
    before = torch.get_num_threads()
    run(store, config(**{"train.backbone": "lightgcn", "train.epochs": 3, "train.threads": 0}))
    assert torch.get_num_threads() == before
    threads = store.read_json("model/model.json")["training"]["threads"]
    assert threads["setting"] == "adaptive" and sum(threads["epochs_per_count"].values()) == 3
    assert all(1 <= int(n) <= before for n in threads["epochs_per_count"])
    run(store, config(**{"train.backbone": "lightgcn", "train.epochs": 2, "train.threads": 1}))
    assert store.read_json("model/model.json")["training"]["threads"] == {"setting": 1, "epochs_per_count": {"1": 2}}


def test_scoped_count_is_set_and_restored_only_when_it_differs():
    calls = []
    state = {"n": 1}

    def set_(n):
        calls.append(n)
        state["n"] = n

    with _scoped(lambda: state["n"], set_, 1):
        pass
    assert calls == []  # already 1: a per-query scope costs no pool resize
    with _scoped(lambda: state["n"], set_, 3):
        assert state["n"] == 3
    assert calls == [3, 1] and state["n"] == 1

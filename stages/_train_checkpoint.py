"""The train stage's per-epoch checkpoints on disk: resume an interrupted :func:`~clearrec.models.trainer.fit`.

A checkpoint folder holds at most one ``epoch-<n>.safetensors`` at rest (model weights, the best
epoch's weights, Adam's state and the RNG states, all as tensors) and ``checkpoint.json`` (the run's
key, the epoch, the history, the best epoch and the SHA-256 of the tensors file). Each file is
written to a temporary name and renamed; the JSON is renamed last, so a kill at any moment leaves
the previous complete checkpoint in force. Nothing is pickled. A checkpoint whose key differs from
the run's (other data, model, settings or initial weights) or whose tensors fail their checksum is
ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..models.trainer import TrainState

_JSON = "checkpoint.json"
_FORMAT = 1


def _atomic_write(dest: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors ``optim.<param>.<key>``, JSON part: scalars + param_groups)."""
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(folder: Path, key: str, state: TrainState) -> None:
    """Write ``state`` atomically into ``folder``, then delete the previous epoch's tensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    optim_tensors, optim_meta = _flatten_optimizer(state.optimizer)
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    tensors.update({f"best.{k}": v for k, v in (state.best or {}).items()})
    tensors.update(optim_tensors)
    tensors["rng.generator"], tensors["rng.torch"] = state.generator, state.torch_rng
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    name = f"epoch-{state.epoch}.safetensors"
    _atomic_write(folder / name, lambda tmp: save_file(tensors, tmp))
    meta = {
        "format": _FORMAT, "key": key, "tensors": name, "tensors_sha256": _sha256(folder / name),
        "epoch": state.epoch, "finished": state.finished, "history": state.history,
        "best_epoch": state.best_epoch, "best_value": state.best_value, "best_valid": state.best_valid,
        "stopped_early": state.stopped_early, "has_best": state.best is not None, "optimizer": optim_meta,
    }
    _atomic_write(folder / _JSON, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(folder: Path, key: str) -> TrainState | None:
    """The checkpoint in ``folder`` for run ``key``, or None (absent, other run, or failing its checksum)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / _JSON).read_text())
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            return None
        path = folder / Path(meta["tensors"]).name
        if _sha256(path) != meta["tensors_sha256"]:
            return None
        tensors = load_file(str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "best": {}, "optim": {}, "rng": {}}
    for name, value in tensors.items():
        prefix, rest = name.split(".", 1)
        groups[prefix][name if prefix == "optim" else rest] = value
    return TrainState(
        epoch=meta["epoch"], finished=meta["finished"], history=meta["history"], best_epoch=meta["best_epoch"],
        best_value=meta["best_value"], best_valid=meta["best_valid"], stopped_early=meta["stopped_early"],
        model=groups["model"], best=groups["best"] if meta["has_best"] else None,
        optimizer=_unflatten_optimizer(groups["optim"], meta["optimizer"]),
        generator=groups["rng"]["generator"], torch_rng=groups["rng"]["torch"],
    )


def clear(folder: Path) -> None:
    """Delete the checkpoint folder (after the run's outputs are written)."""
    shutil.rmtree(folder, ignore_errors=True)

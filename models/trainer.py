"""The training loop: BPR with uniform negative sampling, Adam, full-ranking early stopping.

Model-agnostic: it only calls :meth:`Backbone.pre_epoch`, :meth:`Backbone.loss` and
:meth:`Backbone.vectors`. Pure computation on tensors (no files, no config objects). An
interrupted run resumes from a :class:`TrainState`: ``fit`` hands one to ``on_state`` after
every epoch and continues from one given as ``resume`` (the train stage keeps them on disk).
One epoch = every training pair once, in a fresh random order, each with one negative drawn
uniformly from the items its user has not interacted with in train; every batch is one Adam
step. Epoch e (1-based) trains at ``lr * lr_decay ** ((e - 1) / lr_decay_epochs)``, MMRec's
``learning_rate_scheduler: [lr_decay, lr_decay_epochs]`` (a LambdaLR stepped after each epoch);
``lr_decay = 1`` keeps the rate constant. After each epoch the model is ranked against all
items on ``valid`` (training items masked); training stops after ``patience`` epochs without a
better ``stop_metric``, the best epoch's weights are restored and ``test`` is evaluated with
them. The popularity measures count an item's training interactions. A model without
trainable parameters (Pop, ItemKNN-CBF) is ranked once: one epoch of no steps, loss 0.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .base import Backbone
from .errors import TrainingError
from .metrics import ItemSets, ranking_metrics


@dataclass(frozen=True)
class TrainOptions:
    lr: float = 1e-3  # Adam learning rate (of the first epoch, see lr_decay)
    lr_decay: float = 1.0  # epoch e (1-based) trains at lr * lr_decay ** ((e - 1) / lr_decay_epochs)
    lr_decay_epochs: int = 50
    batch_size: int = 2048  # (user, pos, neg) triples per Adam step
    epochs: int = 1000  # upper bound on epochs
    patience: int = 20  # epochs without a better stop_metric before stopping
    ks: tuple[int, ...] = (5, 10, 20, 50)  # cut-offs of the ranking metrics
    stop_metric: str = "recall@20"  # valid metric that selects the best epoch
    seed: int = 999  # seeds sampling and shuffling
    max_block: int = 1 << 23  # most scores held at once during evaluation (32 MiB of float32)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean training loss over the epoch's batches
    valid: dict[str, float]
    train_seconds: float
    eval_seconds: float


@dataclass
class TrainResult:
    best_epoch: int
    valid: dict[str, float]  # at the best epoch
    test: dict[str, float]  # at the best epoch (empty without a test set)
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int = 0  # epochs restored from a checkpoint (0: trained from the start)


class NegativeSampler:
    """Uniform negatives: items the user has not interacted with in train (rejection sampling)."""

    def __init__(self, train: ItemSets, num_items: int):
        full = torch.nonzero(train.counts() >= num_items).squeeze(1)
        if full.numel():
            raise TrainingError(
                f"{full.numel()} user(s) (e.g. user_idx {int(full[0])}) interacted with every item in train, so no "
                "negative item exists for them; drop such users at ingest or add items"
            )
        rows, items = train.pairs(torch.arange(train.num_users))
        self.keys = rows * num_items + items  # (E,) sorted: user-major, items sorted
        self.num_items = num_items

    def _is_positive(self, users: Tensor, items: Tensor) -> Tensor:
        q = users * self.num_items + items
        pos = torch.searchsorted(self.keys, q).clamp_(max=self.keys.numel() - 1)
        return self.keys[pos] == q

    def sample(self, users: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One negative item per entry of (B,) users -> (B,)."""
        neg = torch.randint(0, self.num_items, users.shape, generator=generator)
        todo = torch.nonzero(self._is_positive(users, neg)).squeeze(1)
        while todo.numel():
            neg[todo] = torch.randint(0, self.num_items, todo.shape, generator=generator)
            todo = todo[self._is_positive(users[todo], neg[todo])]
        return neg


def _adam(model: Backbone, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device / dtype
        return torch.optim.Adam(params, lr=lr)


@dataclass
class TrainState:
    """Everything :func:`fit` needs to continue after ``epoch`` as if it had never stopped."""

    epoch: int  # last completed epoch (1-based)
    finished: bool  # the loop ended (early stop or last epoch); only the test evaluation is left
    history: list[dict[str, Any]]  # EpochRecord fields per epoch
    best_epoch: int
    best_value: float
    best_valid: dict[str, float]
    stopped_early: bool
    model: dict[str, Tensor]  # state_dict after ``epoch``
    best: dict[str, Tensor] | None  # state_dict of the best epoch
    optimizer: dict[str, Any]  # torch optimizer state_dict
    generator: Tensor  # (n,) uint8, the sampling generator's state
    torch_rng: Tensor  # (n,) uint8, torch's global CPU RNG state


def run_key(model: Backbone, train: ItemSets, valid: ItemSets, options: TrainOptions) -> str:
    """What a saved state must match to be resumed: options, model (class, settings, initial weights, code), data.

    Call it on the freshly initialised model, before :func:`fit` changes its weights.
    """
    tensors = {f"init.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"buffer.{k}": v for k, v in model.named_buffers() if v.layout == torch.strided})
    tensors.update({"train.indptr": train.indptr, "train.items": train.items,
                    "valid.indptr": valid.indptr, "valid.items": valid.items})
    code = [inspect.getsource(sys.modules[m]) for m in (type(model).__module__, __name__)]
    h = hashlib.sha256(json.dumps([type(model).__name__, model.hparams(), asdict(options), code], sort_keys=True,
                                  default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fit(
    model: Backbone,
    train: ItemSets,
    valid: ItemSets,
    test: ItemSets | None,
    options: TrainOptions = TrainOptions(),
    on_epoch: Callable[[EpochRecord], None] | None = None,
    resume: TrainState | None = None,
    on_state: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train`` (CPU ItemSets), early-stopping on ``valid``; see module doc.

    After every epoch the state is handed to ``on_state`` (before ``on_epoch``); ``resume``, a
    state of a run with the same model, data and options (:func:`run_key`), continues it: the
    result is the one an uninterrupted run gives (exactly so on CPU).
    """
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    trainable = any(p.requires_grad for p in model.parameters())
    generator = torch.Generator().manual_seed(options.seed)
    sampler = NegativeSampler(train, model.num_items)
    users, pos = train.pairs(torch.arange(train.num_users))  # (E,), (E,)
    if users.numel() == 0:
        raise TrainingError("no training interactions; check that interactions.parquet has split == 'train' rows")
    train_d, valid_d = train.to(device), valid.to(device)
    popularity = torch.bincount(train.items, minlength=model.num_items).to(device)  # (I,) training interactions
    optimizer = _adam(model, options.lr) if trainable else None
    history: list[EpochRecord] = []
    best_epoch, best_value, best_state, best_valid = 0, -math.inf, None, {}
    stopped_early, finished, start_epoch = False, False, 1
    saved = resume
    if saved is not None:
        model.load_state_dict(saved.model)
        if optimizer is not None:
            optimizer.load_state_dict(saved.optimizer)
        generator.set_state(saved.generator)
        torch.set_rng_state(saved.torch_rng)
        history = [EpochRecord(**r) for r in saved.history]
        best_epoch, best_value, best_valid = saved.best_epoch, saved.best_value, saved.best_valid
        best_state = {k: v.to(device) for k, v in saved.best.items()} if saved.best is not None else None
        stopped_early, finished, start_epoch = saved.stopped_early, saved.finished, saved.epoch + 1
    for epoch in range(start_epoch, options.epochs + 1):
        if finished:
            break
        t0 = time.perf_counter()
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = options.lr * options.lr_decay ** ((epoch - 1) / options.lr_decay_epochs)
        model.train()
        model.pre_epoch(generator)
        neg = sampler.sample(users, generator)
        order = torch.randperm(users.numel(), generator=generator)
        total = 0.0
        for start in range(0, order.numel() if optimizer is not None else 0, options.batch_size):
            idx = order[start : start + options.batch_size]
            loss = model.loss(users[idx].to(device), pos[idx].to(device), neg[idx].to(device))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"the training loss became {value} at epoch {epoch}, batch {start // options.batch_size + 1}; "
                    "lower train.lr, or check the features for NaN/inf values and their scale"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * idx.numel()
        t1 = time.perf_counter()
        user_vecs, item_vecs = model.vectors()
        valid_metrics = ranking_metrics(user_vecs, item_vecs, valid_d, train_d, options.ks, options.max_block,
                                        popularity)
        record = EpochRecord(epoch, total / users.numel(), valid_metrics, t1 - t0, time.perf_counter() - t1)
        history.append(record)
        value = valid_metrics[options.stop_metric]
        if value > best_value:
            best_epoch, best_value, best_valid = epoch, value, valid_metrics
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= options.patience:
            stopped_early = True
        finished = stopped_early or epoch == options.epochs or optimizer is None  # nothing to train: one epoch
        if on_state is not None and optimizer is not None:
            on_state(TrainState(epoch, finished, [asdict(r) for r in history], best_epoch, best_value, best_valid,
                                stopped_early, model.state_dict(), best_state, optimizer.state_dict(),
                                generator.get_state(), torch.get_rng_state()))
        if on_epoch is not None:
            on_epoch(record)
    if best_state is not None:
        model.load_state_dict(best_state)
    test_metrics: dict[str, float] = {}
    if test is not None:
        user_vecs, item_vecs = model.vectors()
        test_metrics = ranking_metrics(user_vecs, item_vecs, test.to(device), train_d, options.ks, options.max_block,
                                       popularity)
    return TrainResult(best_epoch, best_valid, test_metrics, history, stopped_early, resumed_from=start_epoch - 1)

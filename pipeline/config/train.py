"""``[train]``: the graph recommender and its training protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import IntTuple, Section, Seed


class LightGCNParams(Section):
    layers: int = Field(3, ge=1, le=64)  # propagation steps on the user-item graph
    reg: float = Field(1e-4, ge=0, le=1e6)  # weight of the regulariser on the batch's ego (layer-0) embeddings


class VBPRParams(Section):
    reg: float = Field(1e-4, ge=0, le=1e6)  # weight of the regulariser on the batch's user / item vectors


class FreedomParams(Section):
    layers: int = Field(2, ge=1, le=64)  # LightGCN layers on the user-item graph
    mm_layers: int = Field(1, ge=1, le=64)  # propagation steps on the frozen item-item graph
    knn_k: int = Field(10, ge=1, le=1000)  # neighbours per item in the frozen item-item graph
    image_weight: float = Field(0.1, ge=0, le=1)  # mix: image_weight * image + (1 - image_weight) * text
    dropout: float = Field(0.8, ge=0, lt=1)  # share of user-item edges pruned each epoch
    reg_weight: float = Field(1e-4, ge=0, le=1e6)  # weight of the feature-alignment BPR losses
    trainable_features: bool = True  # as the reference code; false keeps CLEAR's projection fixed


class TrainConfig(Section):
    backbone: Literal["lightgcn", "vbpr", "freedom"] = "freedom"  # the recommender (see README "Backbones")
    embedding_size: int = Field(64, ge=1, le=65536)  # ID embedding size d (VBPR vectors are 2d)
    lr: float = Field(1e-3, gt=0, le=10)  # Adam learning rate
    batch_size: int = Field(2048, ge=1, le=1 << 26)  # (user, positive, negative) triples per Adam step
    epochs: int = Field(1000, ge=1, le=1_000_000)  # most epochs (one epoch = every training interaction once)
    patience: int = Field(20, ge=1, le=1_000_000)  # epochs without a better valid stop_metric before stopping
    eval_ks: IntTuple = (5, 10, 20, 50)  # cut-offs K of recall / ndcg / precision / map
    stop_metric: str = "recall@20"  # valid metric that selects the best epoch: recall|ndcg|precision|map@K
    seed: Seed = 999  # seeds initialisation, negative sampling, shuffling and edge pruning
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:N
    threads: int = Field(0, ge=0, le=1024)  # torch CPU threads; 0 = torch's default (all cores)
    eval_block: int = Field(1 << 23, ge=1, le=1 << 36)  # most user-item scores held at once during evaluation (x4 bytes)
    lightgcn: LightGCNParams = LightGCNParams()
    vbpr: VBPRParams = VBPRParams()
    freedom: FreedomParams = FreedomParams()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        metric, _, k = self.stop_metric.partition("@")
        if metric not in ("recall", "ndcg", "precision", "map") or not k.isdigit() or int(k) not in self.eval_ks:
            raise ValueError(
                f"stop_metric {self.stop_metric!r} must be recall|ndcg|precision|map@K with K in eval_ks {self.eval_ks}"
            )
        if not self.eval_ks or min(self.eval_ks) < 1 or max(self.eval_ks) > 10_000:
            raise ValueError(f"eval_ks must be cut-offs in 1..10000, got {self.eval_ks}")
        return self

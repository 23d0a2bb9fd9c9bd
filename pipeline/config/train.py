"""``[train]``: the graph recommender and its training protocol."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from .base import IntTuple, Section, Seed

Grid = ClassVar[dict[str, tuple[Any, ...]]]  # dotted config key -> values: ``clearrec compare --grid``
LrDecay = ClassVar[float]  # the reference's learning_rate_scheduler factor (per 50 epochs): train.lr_decay's default


class LightGCNParams(Section):
    """LightGCN. Reference grid (``LightGCN.yaml``): layers [1, 2, 3, 4] x reg [1e-2 ... 1e-6]."""

    GRID: Grid = {"train.lightgcn.layers": (1, 2, 3, 4), "train.lightgcn.reg": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)}

    layers: int = Field(3, ge=1, le=64)  # propagation steps on the user-item graph
    reg: float = Field(1e-4, ge=0, le=1e6)  # weight of the regulariser on the batch's ego (layer-0) embeddings


class VBPRParams(Section):
    """VBPR. Reference grid (``VBPR.yaml``): reg [2.0, 1.0, 1e-1 ... 1e-5]."""

    GRID: Grid = {"train.vbpr.reg": (2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)}

    reg: float = Field(1e-4, ge=0, le=1e6)  # weight of the regulariser on the batch's user / item vectors


class FreedomParams(Section):
    """FREEDOM. Reference grid (``FREEDOM.yaml``): dropout [0.8, 0.9] x reg_weight [0, 1e-5, 1e-4, 1e-3]."""

    GRID: Grid = {"train.freedom.dropout": (0.8, 0.9), "train.freedom.reg_weight": (0.0, 1e-5, 1e-4, 1e-3)}

    layers: int = Field(2, ge=1, le=64)  # LightGCN layers on the user-item graph
    mm_layers: int = Field(1, ge=1, le=64)  # propagation steps on the frozen item-item graph
    knn_k: int = Field(10, ge=1, le=1000)  # neighbours per item in the frozen item-item graph
    # weight of each modality's kNN graph in the item-item graph, normalised to sum 1; it must name exactly the
    # modalities present. Empty: image 0.1 / text 0.9 (the reference) when they are exactly image + text, else equal
    modality_weights: dict[str, Annotated[float, Field(ge=0)]] = {}
    dropout: float = Field(0.8, ge=0, lt=1)  # share of user-item edges pruned each epoch
    reg_weight: float = Field(1e-4, ge=0, le=1e6)  # weight of the feature-alignment BPR losses
    trainable_features: bool = True  # as the reference code; false keeps CLEAR's projection fixed
    image_weight: None = Field(None, exclude=True)  # retired: refused with what to write instead

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "image_weight" in data:
            w = data["image_weight"]
            example = (f"{{image = {w}, text = {round(1 - w, 12)}}}" if isinstance(w, (int, float))
                       and not isinstance(w, bool) and 0 <= w <= 1 else "{image = 0.1, text = 0.9}")
            raise ValueError(f"train.freedom.image_weight is replaced by train.freedom.modality_weights, one weight "
                             f"per modality: write modality_weights = {example} in [train.freedom]")
        return data


class LatticeParams(Section):
    """LATTICE (reference ``LATTICE.yaml``; it also sets ``train.lr`` 1e-4, the first of its grid).

    Reference grid: ``reg_weight`` [0.0, 1e-5, 1e-4, 1e-3] x ``train.lr`` [1e-4, 5e-4, 1e-3, 5e-3].
    """

    GRID: Grid = {"train.lattice.reg_weight": (0.0, 1e-5, 1e-4, 1e-3), "train.lr": (1e-4, 5e-4, 1e-3, 5e-3)}
    LR_DECAY: LrDecay = 0.96  # the reference yaml's learning_rate_scheduler: [0.96, 50]

    feat_embed_dim: int = Field(64, ge=1)  # size of the feature projections the learned item graphs come from
    layers: int = Field(2, ge=1)  # propagation steps on the user-item graph D^-1 (A + I)
    mm_layers: int = Field(1, ge=1)  # propagation steps on the item-item graph
    knn_k: int = Field(10, ge=1)  # neighbours per item in the learned and the frozen kNN graphs
    lambda_coeff: float = Field(0.9, ge=0, le=1)  # share of the frozen feature graph in the item-item graph
    reg_weight: float = Field(0.0, ge=0)  # weight of the regulariser on the batch's final vectors
    trainable_features: bool = True  # as the reference code; false keeps CLEAR's projection fixed


class MgcnParams(Section):
    """MGCN (reference ``MGCN.yaml``). Reference grid: ``cl_weight`` [1e-3, 1e-2, 1e-1]."""

    GRID: Grid = {"train.mgcn.cl_weight": (1e-3, 1e-2, 1e-1)}
    LR_DECAY: LrDecay = 0.96  # the reference yaml's learning_rate_scheduler: [0.96, 50]

    layers: int = Field(2, ge=1)  # propagation steps on the user-item graph
    mm_layers: int = Field(1, ge=1)  # propagation steps on each modality's item-item graph
    knn_k: int = Field(10, ge=1)  # neighbours per item in the kNN graphs
    reg_weight: float = Field(1e-4, ge=0)  # weight of the regulariser on the batch's final vectors
    cl_weight: float = Field(1e-3, ge=0)  # weight of the InfoNCE between the side and the ID views
    temperature: float = Field(0.2, gt=0)  # InfoNCE temperature
    trainable_features: bool = True  # as the reference code; false keeps CLEAR's projection fixed


class SmoreParams(Section):
    """SMORE (reference ``SMORE.yaml``).

    Reference grid: ``layers`` [3, 4] x ``knn_k`` per modality (``image_knn_k`` / ``text_knn_k``)
    [10, 15, 20, 40] each x ``reg_weight`` [1e-5, 1e-4] x ``dropout`` [0, 0.1]. The grid below
    searches one ``knn_k`` for every modality (4 values, not the reference's 16 image x text
    pairs), since the modality names are the catalog's.
    """

    GRID: Grid = {"train.smore.layers": (3, 4), "train.smore.knn_k": (10, 15, 20, 40),
                  "train.smore.reg_weight": (1e-5, 1e-4), "train.smore.dropout": (0.0, 0.1)}
    LR_DECAY: LrDecay = 0.96  # the reference yaml's learning_rate_scheduler: [0.96, 50]

    layers: int = Field(3, ge=1)  # propagation steps on the user-item graph
    mm_layers: int = Field(1, ge=1)  # propagation steps on the item-item graphs
    knn_k: int | dict[str, int] = 10  # neighbours per item in the kNN graphs: one number, or per modality name
    reg_weight: float = Field(1e-5, ge=0)  # weight of the regulariser on the batch's final vectors
    cl_weight: float = Field(0.01, ge=0)  # weight of the InfoNCE between the side and the ID views
    temperature: float = Field(0.2, gt=0)  # InfoNCE temperature
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the modality preference gates
    trainable_features: bool = True  # as the reference code; false keeps CLEAR's projection fixed


class PopParams(Section):
    """Most popular items: no settings."""


class BPRParams(Section):
    """BPR-MF. Reference grid: reg [2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]."""

    GRID: Grid = {"train.bpr.reg": (2.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)}

    reg: float = Field(1e-4, ge=0)  # weight of the regulariser on the batch's user / item vectors (2.0 collapses)


class ItemKNNCBFParams(Section):
    """Content-based item kNN. Reference grid: knn_k [10], shrink [10] (one point: nothing to search)."""

    knn_k: int = Field(10, ge=1)  # most similar items kept per item
    shrink: float = Field(10.0, ge=0)  # added to the norm product in the cosine (damps weak evidence)


class MMGCNParams(Section):
    """MMGCN. Reference grid: reg [0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], train.lr [1e-4, 5e-4, 1e-3, 5e-3, 1e-2]."""

    GRID: Grid = {"train.mmgcn.reg": (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "train.lr": (1e-4, 5e-4, 1e-3, 5e-3, 1e-2)}

    layers: int = Field(3, ge=1)  # convolution layers per modality tower (the reference always runs 3)
    latent: dict[str, int] = {"image": 256}  # modalities projected by an MLP to this width first; others raw
    reg: float = Field(0.0, ge=0)  # weight of the mean-square ID / preference regulariser
    trainable_embeddings: bool = False  # false: fixed random ID / preference tables, as the reference code


class BM3Params(Section):
    """BM3. Reference grid: layers [1, 2], dropout [0.3, 0.5], reg_weight [0.1, 0.01]."""

    GRID: Grid = {"train.bm3.layers": (1, 2), "train.bm3.dropout": (0.3, 0.5), "train.bm3.reg_weight": (0.1, 0.01)}

    layers: int = Field(1, ge=1)  # LightGCN layers on the user-item graph
    dropout: float = Field(0.3, ge=0, lt=1)  # dropout of the target (bootstrap) views
    reg_weight: float = Field(0.1, ge=0)  # weight of the norm regulariser on the user / item tables
    cl_weight: float = Field(2.0, ge=0)  # weight of the modality alignment / masking terms
    trainable_features: bool = True  # as the reference code; false keeps CLEAR's projection fixed


class LGMRecParams(Section):
    """LGMRec. Reference grid (Baby values): every setting a one-value list, as below (nothing to search)."""

    ui_layers: int = Field(2, ge=0)  # LightGCN layers of the collaborative embedding
    mm_layers: int = Field(2, ge=0)  # propagation steps of the modality embeddings on the user-item graph
    hyper_layers: int = Field(1, ge=1)  # hypergraph message-passing layers
    hyper_num: int = Field(4, ge=1)  # hyperedges per modality
    keep_rate: float = Field(0.5, gt=0, le=1)  # share of hyperedge memberships kept (dropout 1 - keep_rate)
    alpha: float = Field(0.3, ge=0)  # weight of the global hypergraph embeddings
    cl_weight: float = Field(1e-4, ge=0)  # weight of the cross-modal hypergraph InfoNCE
    reg_weight: float = Field(1e-6, ge=0)  # weight of the batch regulariser
    tau: float = Field(0.2, gt=0)  # temperature of the Gumbel-softmax and the InfoNCE


class TrainConfig(Section):
    backbone: Literal["lightgcn", "vbpr", "freedom", "lattice", "mgcn", "smore", "mmgcn", "bm3", "lgmrec", "pop", "bpr",
                      "itemknncbf"] = "freedom"  # the recommender (see README "Backbones")
    embedding_size: int = Field(64, ge=1, le=65536)  # ID embedding size d (VBPR vectors are 2d)
    lr: float = Field(1e-3, gt=0, le=10)  # Adam learning rate (of the first epoch)
    lr_decay: float | None = Field(None, gt=0, le=1)  # lr x lr_decay every lr_decay_epochs; unset: the backbone's
    lr_decay_epochs: int = Field(50, ge=1, le=1_000_000)  # reference (0.96 for lattice, mgcn, smore; else 1)
    batch_size: int = Field(2048, ge=1, le=1 << 26)  # (user, positive, negative) triples per Adam step
    epochs: int = Field(1000, ge=1, le=1_000_000)  # most epochs (one epoch = every training interaction once)
    patience: int = Field(20, ge=1, le=1_000_000)  # epochs without a better valid stop_metric before stopping
    eval_ks: IntTuple = (5, 10, 20, 50)  # cut-offs K of every metric (README "Metrics")
    stop_metric: str = "recall@20"  # valid metric that selects the best epoch: recall|ndcg|precision|map|hit|mrr@K
    seed: Seed = 999  # seeds initialisation, negative sampling, shuffling and edge pruning
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:N
    threads: int = Field(0, ge=0, le=1024)  # torch CPU threads; 0 = the CPUs other processes leave free, per epoch
    eval_block: int = Field(1 << 23, ge=1, le=1 << 36)  # most user-item scores held at once during evaluation (x4 bytes)
    lightgcn: LightGCNParams = LightGCNParams()
    vbpr: VBPRParams = VBPRParams()
    freedom: FreedomParams = FreedomParams()
    lattice: LatticeParams = LatticeParams()
    mgcn: MgcnParams = MgcnParams()
    smore: SmoreParams = SmoreParams()
    mmgcn: MMGCNParams = MMGCNParams()
    bm3: BM3Params = BM3Params()
    lgmrec: LGMRecParams = LGMRecParams()
    pop: PopParams = PopParams()
    bpr: BPRParams = BPRParams()
    itemknncbf: ItemKNNCBFParams = ItemKNNCBFParams()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        metric, _, k = self.stop_metric.partition("@")
        per_user = ("recall", "ndcg", "precision", "map", "hit", "mrr")
        if metric not in per_user or not k.isdigit() or int(k) not in self.eval_ks:
            raise ValueError(
                f"stop_metric {self.stop_metric!r} must be recall|ndcg|precision|map|hit|mrr@K with K in eval_ks "
                f"{self.eval_ks}"
            )
        if not self.eval_ks or min(self.eval_ks) < 1 or max(self.eval_ks) > 10_000:
            raise ValueError(f"eval_ks must be cut-offs in 1..10000, got {self.eval_ks}")
        return self


def reference_lr_decay(backbone: str) -> float:
    """``train.lr_decay``'s default for ``backbone``: its reference's learning-rate decay (1.0: none)."""
    return getattr(TrainConfig.model_fields[backbone].annotation, "LR_DECAY", 1.0)

"""Backbone name -> recommender class. Adding a backbone = one file in models/ + one line here."""

from __future__ import annotations

from .base import Backbone
from .bm3 import BM3
from .bpr import BPRMF
from .freedom import FREEDOM
from .itemknn_cbf import ItemKNNCBF
from .lattice import LATTICE
from .lgmrec import LGMRec
from .lightgcn import LightGCN
from .mgcn import MGCN
from .mmgcn import MMGCN
from .pop import Pop
from .smore import SMORE
from .vbpr import VBPR

BACKBONES: dict[str, type[Backbone]] = {
    "lightgcn": LightGCN,
    "vbpr": VBPR,
    "freedom": FREEDOM,
    "lattice": LATTICE,
    "mgcn": MGCN,
    "smore": SMORE,
    "mmgcn": MMGCN,
    "bm3": BM3,
    "lgmrec": LGMRec,
    "pop": Pop,
    "bpr": BPRMF,
    "itemknncbf": ItemKNNCBF,
}


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name``; raises KeyError naming the known backbones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None

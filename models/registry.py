"""Backbone name -> recommender class. Adding a backbone = one file in models/ + one line here."""

from __future__ import annotations

from .base import Backbone
from .freedom import FREEDOM
from .lightgcn import LightGCN
from .vbpr import VBPR

BACKBONES: dict[str, type[Backbone]] = {
    "lightgcn": LightGCN,
    "vbpr": VBPR,
    "freedom": FREEDOM,
}


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name``; raises KeyError naming the known backbones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None

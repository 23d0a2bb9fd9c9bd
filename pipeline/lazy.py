"""A module imported on first use, for the heavy libraries of code that is imported but not always run.

The stage modules are imported by every command (``clearrec --help`` and ``status`` read their
specs), but torch, pandas, faiss and matplotlib are needed only when a stage runs; each is bound
at the top of a stage module as ``torch = lazy_module("torch")`` and imported by its first
attribute access. Nothing is put in ``sys.modules`` until then.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    """Stands for the module named ``__name__``; every attribute is read from the imported module."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__name__))


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` (absolute dotted name) that imports the module on first attribute access."""
    return _LazyModule(name)

"""The ``clearrec`` command line."""

from .main import app, main
from . import experiments  # noqa: F401
from . import diagnose  # noqa: F401
from . import query  # noqa: F401
from . import serve  # noqa: F401

__all__ = ["app", "main"]

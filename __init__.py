"""clearrec: a raw multimodal catalog to a served recommender, with CLEAR in the middle.

The pipeline runs ``ingest -> encode -> project -> train -> index`` over one work
directory; see ``README.md`` for the commands and ``pipeline/`` for the runner.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open"]


def open(workdir, **kwargs):  # noqa: A001 - mirrors the built-in on purpose: clearrec.open(workdir)
    """Open a finished work directory for querying (see ``pipeline.api.Recommender``)."""
    from .pipeline.api import open_workdir

    return open_workdir(workdir, **kwargs)

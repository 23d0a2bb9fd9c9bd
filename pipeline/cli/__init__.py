"""The ``clearrec`` command line."""

import os

# Huge pages for PyTorch's CPU allocations: training allocates large per-step tensors whose cost is
# mostly page faults (BENCHMARKS.md, "Training"). PyTorch reads this once, so it is set before the
# stage modules import torch; a value the user exported wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# No Hugging Face progress bars (transformers' per-model "Loading weights" bar) on the console: the
# stages print their own progress. Read when huggingface_hub is imported; a value the user exported wins.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from .main import app, main  # noqa: E402
from . import experiments  # noqa: F401,E402
from . import diagnose  # noqa: F401,E402
from . import query  # noqa: F401,E402
from . import serve  # noqa: F401,E402

__all__ = ["app", "main"]

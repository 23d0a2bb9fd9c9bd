"""The closing block of ``clearrec run``: what was built and where, test metrics, commands to try next.

Read from the work directory's ``manifest.json`` and ``model/metrics.json`` only, so it says what is
on disk, whichever stages this run executed.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence


if TYPE_CHECKING:
    from ..store import ArtifactStore

HEADLINE_METRICS = ("recall", "ndcg", "precision", "map")


def command(name: str, config: Path | None, workdir: Path, *args: str) -> str:
    """A copy-pasteable ``clearrec`` command line for the given config and work directory."""
    parts = ["clearrec", name]
    if config is not None:
        parts += ["--config", str(config)]
    parts += ["--workdir", str(workdir), *args]
    return " ".join(shlex.quote(p) for p in parts)


def run_summary(root: Path, stage_names: Sequence[str], config: Path | None) -> list[str]:
    """Lines of the closing block for work directory ``root`` (pipeline order ``stage_names``)."""
    from ..store import ArtifactStore  # pyarrow: only once a run has happened, never for --help
    from ..workdir import METRICS, read_manifest

    store = ArtifactStore(root)
    stages = _read(store, read_manifest, {}).get("stages", {})
    lines = [f"Built in {root}:"]
    for name in stage_names:
        entry = stages.get(name)
        if not entry or entry.get("status") != "ok":
            state = "not built" if not entry else f"{entry.get('status')}: {entry.get('error', '')}"
            lines.append(f"  {name:<8} {state}")
            continue
        outputs = sorted(entry.get("outputs", {}))
        shown = ", ".join(outputs[:4]) + (f" and {len(outputs) - 4} more" if len(outputs) > 4 else "")
        lines.append(f"  {name:<8} {shown}")
    metrics = _read(store, lambda s: s.read_json(METRICS) if s.exists(METRICS) else None, None)
    if metrics and metrics.get("test"):
        test = metrics["test"]
        k = _headline_k(test)
        shown = ", ".join(f"{m}@{k} {test[f'{m}@{k}']:.4f}" for m in HEADLINE_METRICS if f"{m}@{k}" in test)
        lines.append(f"Test metrics (model/metrics.json, best epoch {metrics.get('best_epoch', '?')}): {shown}")
    lines.append("Try next:")
    if (stages.get("index") or {}).get("status") == "ok":
        user = _first_user(root)
        lines.append("  " + command("query", config, root, *(["--user", user] if user else ["--text", "toy"]),
                                    "-k", "10"))
        lines.append("  " + command("serve", config, root))
    else:
        lines.append("  " + command("run", config, root) + "   # build the rest (index) to query and serve")
    lines.append("  " + command("report", config, root) + f"   # writes {root / 'report.html'}")
    lines.append("  " + command("compare", config, root, "--seeds", "0", "--epochs", "20")
                 + "   # CLEAR off vs on per backbone")
    return lines


def _headline_k(metrics: dict[str, Any]) -> int:
    ks = sorted({int(key.split("@")[1]) for key in metrics if "@" in key and key.split("@")[1].isdigit()})
    return 20 if 20 in ks else (ks[0] if ks else 20)


def _first_user(root: Path) -> str | None:
    import pyarrow.parquet as pq

    from ..workdir import USER_VECTORS

    path = root / USER_VECTORS
    try:
        ids = pq.ParquetFile(path).read_row_group(0, columns=["user_id"])["user_id"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return str(ids[0].as_py()) if len(ids) else None


def _read(store: ArtifactStore, read: Any, default: Any) -> Any:
    from ..errors import ArtifactError

    try:
        return read(store)
    except ArtifactError:
        return default

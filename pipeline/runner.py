"""Stage runner: fingerprints, skip-if-up-to-date, manifest, selection, resume hints.

A stage's fingerprint is the SHA-256 of: the checksums of its input artifacts (as they are
on disk right before it runs), the checksums of its external input files, the values of
the config keys it reads, and its code version. A stage is skipped when its fingerprint
equals the one in ``manifest.json`` and every output it recorded still has its checksum.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq
from rich.console import Console
from rich.markup import escape

from .config import Config
from .errors import ArtifactError, ClearrecError, ConfigError, StageError
from .stage import StageContext, StageSpec
from .store import ArtifactStore, sha256_file
from .workdir import MANIFEST, read_manifest

UP_TO_DATE, STALE, NEVER_RUN = "up-to-date", "stale", "never-run"
FORCED = "forced"  # manifest status while a --force run is under way: the stage stays stale until it completes


@dataclass(frozen=True)
class StageState:
    state: str  # up-to-date | stale | never-run
    reason: str


def select_stages(
    stages: Sequence[StageSpec],
    only: Sequence[str] | None = None,
    from_: str | None = None,
    to: str | None = None,
) -> list[StageSpec]:
    """The stages to run, in pipeline order; unknown names raise with a 'did you mean'."""
    names = [s.name for s in stages]

    def check(name: str) -> str:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown stage {name!r}; {hint}stages are: {', '.join(names)}")
        return name

    if only and (from_ or to):
        raise ConfigError("--only cannot be combined with --from / --to")
    if only:
        wanted = {check(n) for item in only for n in item.split(",") if n}
        return [s for s in stages if s.name in wanted]
    lo = names.index(check(from_)) if from_ else 0
    hi = names.index(check(to)) if to else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {from_} comes after --to {to}; stages run in order {', '.join(names)}")
    return list(stages[lo : hi + 1])


class Runner:
    """Runs stages over one work directory and keeps its manifest."""

    def __init__(self, stages: Sequence[StageSpec], config: Config, workdir: str | Path, console: Console | None = None):
        self.stages = list(stages)
        self.config = config
        self.store = ArtifactStore(workdir)
        self.console = console or Console(stderr=True)
        self._producers = {out: s.name for s in self.stages for out in s.outputs_for(config)}

    # ---- manifest --------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        try:
            return read_manifest(self.store)
        except ArtifactError:
            self.console.print(f"[yellow]warning:[/] {escape(str(self.store.path(MANIFEST)))} is unreadable; treating every stage as never run")
            return {"stages": {}}

    def _save_entry(self, name: str, entry: dict[str, Any]) -> None:
        from .. import __version__

        data = self.manifest()
        data["clearrec_version"] = __version__
        data["config_file"] = str(self.config.source) if self.config.source else None
        data["stages"][name] = entry
        data["stages"] = {s.name: data["stages"][s.name] for s in self.stages if s.name in data["stages"]}
        self.store.write_json(MANIFEST, data)

    # ---- fingerprints ----------------------------------------------------------------
    def fingerprint_parts(self, stage: StageSpec) -> dict[str, Any]:
        """Everything a stage's result depends on, read from disk now."""
        config = {key: self.config.get(key) for key in stage.config_keys}
        inputs = {name: (self.store.checksum(name) if self.store.exists(name) else None) for name in stage.inputs_for(self.config)}
        external: dict[str, str | None] = {}
        if stage.external_inputs is not None:
            for p in stage.external_inputs(self.config):
                p = Path(p)
                external[str(p)] = sha256_file(p) if p.is_file() else None
        return {"config": config, "inputs": inputs, "external": external, "code": stage.code_version()}

    @staticmethod
    def fingerprint(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    # ---- status ----------------------------------------------------------------------
    def stage_state(self, stage: StageSpec, parts: dict[str, Any] | None = None, check_upstream: bool = True,
                    _memo: dict[str, StageState] | None = None) -> StageState:
        """Is ``stage`` up to date, stale (and why), or never run?"""
        memo = _memo if _memo is not None else {}
        if stage.name in memo:
            return memo[stage.name]
        entry = self.manifest()["stages"].get(stage.name)
        state = self._state(stage, entry, parts, check_upstream, memo)
        memo[stage.name] = state
        return state

    def _state(self, stage: StageSpec, entry: dict[str, Any] | None, parts: dict[str, Any] | None,
               check_upstream: bool, memo: dict[str, StageState]) -> StageState:
        if entry is None:
            return StageState(NEVER_RUN, "no record in the manifest")
        if entry.get("status") == FORCED:
            return StageState(STALE, f"a --force run started at {entry.get('started')} did not complete")
        if entry.get("status") != "ok":
            return StageState(STALE, f"last run failed: {entry.get('error', 'unknown error')}")
        if check_upstream:
            by_name = {s.name: s for s in self.stages}
            for name in stage.inputs_for(self.config):
                producer = self._producers.get(name)
                if producer and producer != stage.name:
                    up = self.stage_state(by_name[producer], _memo=memo)
                    if up.state != UP_TO_DATE:
                        return StageState(STALE, f"upstream stage '{producer}' is {up.state}")
        parts = parts or self.fingerprint_parts(stage)
        old = entry.get("parts", {})
        if old.get("code") != parts["code"]:
            return StageState(STALE, f"code changed ({old.get('code')} -> {parts['code']})")
        changed = _changed_keys(old.get("config", {}), parts["config"])
        if changed:
            return StageState(STALE, f"config changed: {', '.join(changed)}")
        changed = _changed_keys(old.get("inputs", {}), parts["inputs"])
        if changed:
            return StageState(STALE, f"input changed: {', '.join(changed)}")
        changed = _changed_keys(old.get("external", {}), parts["external"])
        if changed:
            return StageState(STALE, f"source file changed: {', '.join(changed)}")
        for name, rec in entry.get("outputs", {}).items():
            if not self.store.exists(name):
                return StageState(STALE, f"output {name} is missing")
            if self.store.checksum(name) != rec["sha256"]:
                return StageState(STALE, f"output {name} was modified")
        return StageState(UP_TO_DATE, f"fingerprint {entry['fingerprint'][:12]} unchanged, outputs verified")

    def status(self) -> dict[str, StageState]:
        memo: dict[str, StageState] = {}
        return {s.name: self.stage_state(s, _memo=memo) for s in self.stages}

    # ---- running ---------------------------------------------------------------------
    def run(self, selected: Sequence[StageSpec] | None = None, force: bool = False, dry_run: bool = False,
            resume_hint: str = "clearrec run") -> list[str]:
        """Run ``selected`` stages (default all) in order; returns the names of stages that ran.

        With ``dry_run`` nothing runs; the names returned are the stages that would run, and
        those downstream of them that a real run checks again once their inputs are rewritten.
        """
        selected = list(selected) if selected is not None else self.stages
        ran: list[str] = []
        pending: dict[str, str] = {}  # dry run: output -> the stage that would rewrite it
        with self._lock():
            for stage in selected:
                parts = self.fingerprint_parts(stage)  # taken before the stage runs
                state = self.stage_state(stage, parts, check_upstream=False)
                if state.state == UP_TO_DATE and not force:
                    changing = [name for name in stage.inputs_for(self.config) if name in pending]
                    if dry_run and changing:
                        # a real run re-checks this stage after its upstream ran: it reruns if the
                        # new input differs, so a dry run cannot say "skipped"
                        producer = pending[changing[0]]
                        self.console.print(f"[cyan]may run[/]   {stage.name:<8} (checked after {producer} runs: "
                                           f"reruns if {', '.join(changing)} change)")
                        pending.update({out: stage.name for out in stage.outputs_for(self.config)})
                        ran.append(stage.name)
                        continue
                    self.console.print(f"[dim]· {stage.name:<8} up to date, skipped[/]")
                    continue
                reason = "--force" if force else state.reason
                if dry_run:
                    self.console.print(f"[cyan]would run[/] {stage.name:<8} ({escape(reason)})")
                    pending.update({out: stage.name for out in stage.outputs_for(self.config)})
                    ran.append(stage.name)
                    continue
                self.console.print(f"[bold cyan]▶ {stage.name}[/] ({escape(reason)})")
                self._run_one(stage, parts, resume_hint, forced=force)
                ran.append(stage.name)
        if not ran:
            self.console.print(f"[green]Nothing to do:[/] all {len(selected)} selected stage(s) are up to date.")
        return ran

    def adopt(self, stage: StageSpec, donor: str | Path, same_fingerprint: bool = True) -> bool:
        """Take ``stage``'s finished run from the work directory ``donor``: link its outputs here, record its entry.

        Adopted only if the donor's run succeeded and its outputs still have their recorded
        checksums, and (``same_fingerprint``) if its fingerprint is the one ``stage`` has here
        now, i.e. running it here would produce the same outputs. Returns whether it was adopted.
        """
        src = ArtifactStore(donor)
        try:
            entry = read_manifest(src)["stages"].get(stage.name)
        except ArtifactError:
            return False
        if not entry or entry.get("status") != "ok" or src.root.resolve() == self.store.root.resolve():
            return False
        if same_fingerprint and entry.get("fingerprint") != self.fingerprint(self.fingerprint_parts(stage)):
            return False
        outputs = entry.get("outputs", {})
        if any(not src.exists(n) or src.checksum(n) != rec["sha256"] for n, rec in outputs.items()):
            return False
        for name in outputs:
            _link(src.path(name), self.store.path(name))
        self._save_entry(stage.name, entry)
        return True

    def _run_one(self, stage: StageSpec, parts: dict[str, Any], resume_hint: str, forced: bool = False) -> None:
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        ctx = StageContext(store=self.store, config=self.config.view(stage.config_keys, stage.name),
                           console=self.console)
        base = {"fingerprint": self.fingerprint(parts), "parts": parts, "started": started.isoformat()}
        if forced:  # a killed forced run must not leave the old record standing as up to date
            self._save_entry(stage.name, {**base, "status": FORCED})
        try:
            result = stage.run(ctx)
        except BaseException as e:
            elapsed = time.perf_counter() - t0
            msg = str(e) or type(e).__name__
            self._save_entry(stage.name, {**base, "status": "failed", "error": msg, "seconds": round(elapsed, 3),
                                          "ended": datetime.now(timezone.utc).isoformat()})
            if isinstance(e, KeyboardInterrupt):
                self.console.print(f"[red]✗ {stage.name} interrupted[/]. Resume with: {escape(resume_hint)} --from {stage.name}")
                raise
            self.console.print(f"[bold red]✗ {stage.name} failed[/]: {escape(msg)}")
            self.console.print(f"Fix the cause, then resume with: [bold]{escape(resume_hint)} --from {stage.name}[/]")
            if isinstance(e, ClearrecError) and not isinstance(e, StageError):
                raise StageError(stage.name, msg) from e
            if isinstance(e, StageError):
                raise
            raise StageError(stage.name, f"{type(e).__name__}: {msg}") from e
        elapsed = time.perf_counter() - t0
        outputs = {}
        for name in result.outputs:
            path = self.store.path(name)
            rec: dict[str, Any] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            if name.endswith(".parquet"):
                rec["rows"] = pq.ParquetFile(path).metadata.num_rows
            outputs[name] = rec
        self._save_entry(stage.name, {**base, "status": "ok", "ended": datetime.now(timezone.utc).isoformat(),
                                      "seconds": round(elapsed, 3), "outputs": outputs, "counts": result.counts})
        line = f"[green]✓ {stage.name}[/] in {elapsed:.1f}s"
        if result.summary:
            line += f": {escape(result.summary)}"
        self.console.print(line)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        path = self.store.path(".lock")
        with open(path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise ClearrecError(f"another clearrec run is using {self.store.root}; wait for it to finish") from e
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (a copy across filesystems), replacing ``dst`` atomically."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"{k}.{sub}" for sub in _changed_keys(a, b))
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(k)
    return out

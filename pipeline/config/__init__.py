"""Typed run config: one TOML file, one section per stage, unknown keys rejected.

``load_config(path, overrides)`` reads the TOML, applies ``--set section.key=value``
overrides (values parsed as TOML literals), checks every key against the schema with a
"did you mean", and returns a frozen :class:`Config`. Relative paths in the file are
resolved against the config file's folder (:meth:`Config.resolve`).
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any, Iterable

import tomli_w
from pydantic import BaseModel, PrivateAttr, ValidationError

from ..errors import ConfigError
from .base import Section
from .encode import EncodeConfig
from .index import IndexConfig
from .ingest import IngestConfig
from .project import ProjectConfig
from .train import TrainConfig

DEFAULT_CONFIG_NAME = "clearrec.toml"
SUGGEST_CUTOFF = 0.7  # difflib similarity a "did you mean" key needs (kcor -> kcore 0.89, bogus -> epochs 0.36)

__all__ = [
    "Config",
    "ConfigView",
    "EncodeConfig",
    "IndexConfig",
    "IngestConfig",
    "ProjectConfig",
    "Section",
    "TrainConfig",
    "load_config",
    "DEFAULT_CONFIG_NAME",
]


class Config(Section):
    workdir: str = "work"  # work directory (relative to the current directory) unless --workdir is given
    ingest: IngestConfig = IngestConfig()
    encode: EncodeConfig = EncodeConfig()
    project: ProjectConfig = ProjectConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the config are resolved against."""
        return self._base_dir

    @property
    def source(self) -> Path | None:
        return self._source

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path from the config against the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    def get(self, dotted: str) -> Any:
        """Value of a dotted key (``"ingest"`` gives the whole section as a dict)."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {dotted!r}")
            node = node[part]
        return node

    def with_overrides(self, overrides: dict[str, Any], origins: dict[str, str] | None = None) -> "Config":
        """A new config with dotted keys replaced (validated like the file); errors name each key's
        origin (``origins``: key -> e.g. ``"--set train.lr=fast"``; default ``"override key=value"``)."""
        data = self.model_dump(mode="json")
        origins = {key: (origins or {}).get(key, f"override {key}={value!r}") for key, value in overrides.items()}
        for key, value in overrides.items():
            _set_dotted(data, key, value, origins[key])
        return _build(data, self._base_dir, self._source, origins)

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.model_dump(mode="json")))

    def view(self, keys: Iterable[str], stage: str) -> "ConfigView":
        """What stage ``stage`` may read: the dotted ``keys`` it declares (and the path helpers)."""
        return ConfigView(self, tuple(keys), stage)


class ConfigView:
    """A read-only view of a config that allows only declared dotted keys (or whole sections).

    A stage gets one (``StageContext.config``) built from its ``config_keys``, the keys that
    enter its fingerprint; reading any other key raises :class:`ConfigError`, so a stage's
    fingerprint cannot drift from what it reads. ``resolve``, ``base_dir`` and ``source``
    (where the config file is) are always available.
    """

    _ALWAYS = ("resolve", "base_dir", "source")

    def __init__(self, node: Any, keys: tuple[str, ...], stage: str, prefix: str = ""):
        self._node, self._keys, self._stage, self._prefix = node, keys, stage, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._prefix and name in self._ALWAYS:
            return getattr(self._node, name)
        dotted = f"{self._prefix}{name}"
        value = getattr(self._node, name)
        if any(dotted == k or dotted.startswith(f"{k}.") for k in self._keys):
            return value
        if any(k.startswith(f"{dotted}.") for k in self._keys):
            return ConfigView(value, self._keys, self._stage, f"{dotted}.")
        raise ConfigError(f"stage {self._stage!r} reads config key {dotted!r}, which it does not declare: add it "
                          f"to the stage's config_keys (declared: {', '.join(self._keys) or 'none'})")

    def get(self, dotted: str) -> Any:
        """Value of a declared dotted key (as :meth:`Config.get`)."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (default ``./clearrec.toml``), apply ``key=value`` overrides, validate."""
    if path is None:
        path = Path.cwd() / DEFAULT_CONFIG_NAME
        if not path.is_file():
            raise ConfigError(
                f"no {DEFAULT_CONFIG_NAME} in {Path.cwd()}; pass --config PATH "
                "(the sample run is sample_data/clearrec.toml)"
            )
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config with an existing TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    _check_keys(data, Config, "", f"in {path}")
    origins: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        origins[key] = f"--set {item}"
        _set_dotted(data, key, value, origins[key])
    return _build(data, path.parent, path, origins)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is a TOML literal or a bare string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.01)")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _build(data: dict[str, Any], base_dir: Path, source: Path | None, origins: dict[str, str]) -> Config:
    """Validate ``data``; errors name the file or the override (``origins``: dotted key -> its origin)."""
    in_file = f"in {source}" if source else "in the defaults"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        lines, wheres = [], []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
            where = _where(loc, origins, in_file)
            wheres.append(where)
            lines.append(f"  {loc or '(top level)'}: {err['msg']} (got {err.get('input')!r}) [{where}]")
        raise ConfigError(f"invalid config {' and '.join(dict.fromkeys(wheres))}:\n" + "\n".join(lines)) from None
    cfg._base_dir = base_dir
    cfg._source = source
    return cfg


def _where(loc: str, origins: dict[str, str], in_file: str) -> str:
    """Where the value at ``loc`` came from: the override that set it, else the file (or, for a check of a
    whole section, the file together with the overrides of keys inside it)."""
    if loc in origins:
        return f"from {origins[loc]}"
    inside = [o for key, o in origins.items() if not loc or key.startswith(loc + ".")]
    return f"{in_file} with {', '.join(inside)}" if inside else in_file


def _check_keys(data: Any, model: type[BaseModel], prefix: str, where: str) -> None:
    """Raise :class:`ConfigError` on the first key not in the schema, with a close suggestion if any."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            retired = model.retired(key, data, where) if issubclass(model, Section) else None
            if retired:
                raise ConfigError(retired)
            known = [f"{prefix}{k}" for k in fields]
            # compared by the key's own name: a shared section prefix would make any two keys look alike
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=SUGGEST_CUTOFF)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys here: {', '.join(known)}"
            raise ConfigError(f"unknown config key {dotted!r} {where}{hint}")
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted!r} {where} must be a table ([{dotted}]), got {value!r}")
            _check_keys(value, sub, f"{dotted}.", where)
        elif typing.get_origin(sub) is dict and isinstance(value, dict):  # a table of named tables
            inner = typing.get_args(sub)[1]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                for name, table in value.items():
                    if not isinstance(table, dict):
                        raise ConfigError(f"'{dotted}.{name}' {where} must be a table ([{dotted}.{name}]), got {table!r}")
                    _check_keys(table, inner, f"{dotted}.{name}.", where)


def _set_dotted(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set dotted ``key`` in ``data`` after checking it against the schema (errors name ``origin``)."""
    parts = key.split(".")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    _check_keys(nested, Config, "", f"from {origin}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r} from {origin}: {part!r} is not a section")
    node[parts[-1]] = value


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj

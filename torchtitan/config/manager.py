"""Build a JobConfig from defaults, a TOML file and command-line overrides.

Precedence is CLI > TOML (a file after the files it extends) > defaults. Parsing problems (unknown keys,
types, choices, files) are a ConfigError with one line naming the key or file and what is valid; every check
across keys, the model and the world size is in trainer/checks.py. `train.py` prints the line and exits
non-zero before any process group exists.
"""
from __future__ import annotations

import difflib
import os
import sys
import types
import typing
from dataclasses import asdict, fields, is_dataclass
from types import MappingProxyType
from typing import Any

from torchtitan.config.job_config import ALIASES, JobConfig
from torchtitan.config.torchtitan_keys import TORCHTITAN_KEYS, Alias, flatten, translate
from torchtitan.tools.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(JobConfig)}  # type: ignore[misc]


def _field_map(section_cls) -> dict[str, Any]:
    return {f.name: f for f in fields(section_cls)}


def _resolved_type(section_cls, name: str):
    return typing.get_type_hints(section_cls)[name]


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _convert_tables(key: str, raw: Any, cls, from_cli: bool) -> list:
    """A TOML array of tables ([[data.sources]]) as a list of `cls` dataclasses, each key checked and typed."""
    if from_cli:
        raise ConfigError(f"{key}: write these as [[{key}]] tables in the TOML file; the command line cannot set them")
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise ConfigError(f"{key}: expected [[{key}]] tables, got {raw!r}")
    out = []
    for i, table in enumerate(raw):
        fmap = _field_map(cls)
        for name in table:
            if name not in fmap:
                raise ConfigError(f"{key}[{i}]: unknown key '{name}'{_suggest(name, fmap)}; valid: {', '.join(fmap)}")
        out.append(cls(**{name: _convert(f"{key}[{i}].{name}", value, _resolved_type(cls, name), False)
                          for name, value in table.items()}))
    return out


def _convert_list(key: str, raw: Any, elem, from_cli: bool) -> list:
    if is_dataclass(elem):
        return _convert_tables(key, raw, elem, from_cli)
    if isinstance(raw, str) and from_cli:
        raw = raw.strip()
        if raw.startswith("[") and raw.endswith("]"):  # OLMo's --data.paths=[a,b]
            raw = raw[1:-1]
        raw = [s.strip().strip("'\"") for s in raw.split(",") if s.strip()]
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: expected a list of {elem.__name__}, got {raw!r}")
    return [_convert(key, x, elem, from_cli) for x in raw]


def _convert_bool(key: str, raw: Any, from_cli: bool) -> bool:
    if isinstance(raw, bool):
        return raw
    if from_cli and isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
        return raw.lower() in ("true", "1", "yes")
    raise ConfigError(f"{key}: expected true or false, got {raw!r}")


def _convert_number(key: str, raw: Any, base: type, from_cli: bool) -> int | float:
    what = "an integer" if base is int else "a number"
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: expected {what}, got {raw!r}")
    if isinstance(raw, base) or (base is float and isinstance(raw, int)):
        return base(raw)
    if base is int and isinstance(raw, float) and raw.is_integer() and not from_cli:
        return int(raw)
    if from_cli and isinstance(raw, str):
        try:
            return base(raw)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {what}, got {raw!r}")


def _convert(key: str, raw: Any, tp, from_cli: bool) -> Any:
    """Convert a TOML value or CLI string to the field's type, or raise ConfigError."""
    base, optional = _unwrap_optional(tp)
    if optional and (raw is None or (from_cli and isinstance(raw, str) and raw.lower() in ("none", "null"))):
        return None
    if typing.get_origin(base) is list:
        (elem,) = typing.get_args(base)
        return _convert_list(key, raw, elem, from_cli)
    if base is bool:
        return _convert_bool(key, raw, from_cli)
    if base in (int, float):
        return _convert_number(key, raw, base, from_cli)
    if base is str:
        if isinstance(raw, str):
            return raw
        if not from_cli and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)  # e.g. selective_ac_option = 2
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _canonical_key(key: str) -> str:
    """Map a dotted key (alias or canonical) to its canonical location, or raise."""
    key = ALIASES.get(key, key)
    if "." not in key:
        raise ConfigError(f"'{key}': keys are written section.key, e.g. training.steps")
    section, name = key.split(".", 1)
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'{_suggest(section, sections)}; "
                          f"valid: {', '.join(sections)}")
    fmap = _field_map(sections[section])
    if name not in fmap:
        known = list(fmap) + [a.split(".", 1)[1] for a in ALIASES if a.startswith(section + ".")]
        raise ConfigError(f"unknown config key '{section}.{name}'{_suggest(name, known)}")
    return key


def _set(cfg: JobConfig, key: str, raw: Any, from_cli: bool, notes: list[str]) -> str | None:
    """Set one key; returns its canonical name (None: a torchtitan key accepted with nothing to set)."""
    torchtitan_name = key in TORCHTITAN_KEYS
    if torchtitan_name:
        key, raw, note = translate(key, raw, from_cli)
        if note:
            notes.append(note)
        if key is None:
            return None
    key = _canonical_key(key)
    if torchtitan_name:
        cfg.torchtitan_keys = cfg.torchtitan_keys | {key}
    section, name = key.split(".", 1)
    sec = getattr(cfg, section)
    f = _field_map(type(sec))[name]
    value = _convert(key, raw, _resolved_type(type(sec), name), from_cli)
    choices = f.metadata.get("choices")
    if choices is not None:
        vals = value if isinstance(value, list) else [value]
        for v in vals:
            if v is not None and v not in choices:
                raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, choices))}")
    setattr(sec, name, value)
    return key


def _is_bool_key(key: str) -> bool:
    entry = TORCHTITAN_KEYS.get(key)
    if entry is not None:
        key = entry.key if isinstance(entry, Alias) else key
        if not isinstance(entry, Alias):
            return isinstance(getattr(entry, "default", None), bool)
    try:
        key = _canonical_key(key)
    except ConfigError:
        return False
    section, name = key.split(".", 1)
    tp, _ = _unwrap_optional(_resolved_type(_sections()[section], name))
    return tp is bool


def _negated_bool(body: str) -> str | None:
    section, _, name = body.partition(".")
    if name.startswith("no-") and _is_bool_key(f"{section}.{name[3:]}"):
        return f"{section}.{name[3:]}"
    return None


def parse_cli(argv: list[str]) -> list[tuple[str, str]]:
    """Split `--section.key value`, `--section.key=value` and bare boolean flags."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") and arg.endswith(".toml"):
            pairs.append(("job.config_file", arg))  # OLMo's `train.py CONFIG --key=value ...`: this file wins
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --section.key value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif _is_bool_key(body) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            key, value = body, "true"
            i += 1
        elif _negated_bool(body):
            key, value = _negated_bool(body), "false"  # --compile.no-enable, as tyro-based CLIs accept
            i += 1
        else:
            if i + 1 >= len(argv):
                _canonical_key(body)  # unknown key gets the better message
                raise ConfigError(f"--{body} needs a value")
            key, value = body, argv[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def _load_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def config_chain(path: str, _seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(file, its tables) from the root base to `path`: `extends = "base.toml"` at the top of a file names the
    file it builds on, relative to it. Applied in this order, a later file's keys replace an earlier one's, key
    by key (a list or a scalar is replaced whole)."""
    real = os.path.realpath(path)
    if real in _seen:
        cycle = " -> ".join([*(os.path.relpath(p) for p in _seen), os.path.relpath(real)])
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    data = _load_toml(path)
    base = data.pop("extends", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a file name (a string), got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: extends = {base!r}: no such file ({base_path})")
    return [*config_chain(base_path, (*_seen, real)), (path, data)]


def _apply_file(cfg: JobConfig, path: str, data: dict, set_by: dict[str, str], notes: list[str]) -> None:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level '{section}' must be a [section] table (extends = \"file\" is the "
                              f"only top-level key)")
        for key, raw in flatten(values, section):
            try:
                canonical = _set(cfg, key, raw, from_cli=False, notes=notes)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
            if canonical is not None:
                set_by[canonical] = path


def load_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> JobConfig:
    """Resolve the job config from CONFIG/CONFIG_FILE, --job.config_file (and the files it extends) and
    overrides. cfg.set_by records where each key the user set came from: a file's path, or "cli"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    overrides = parse_cli(argv)
    config_file = env.get("CONFIG") or env.get("CONFIG_FILE") or None
    config_origin = f"{'CONFIG' if env.get('CONFIG') else 'CONFIG_FILE'} environment variable"
    for key, value in overrides:
        if key == "job.config_file":
            config_file = value
    cfg = JobConfig()
    set_by: dict[str, str] = {}
    notes: list[str] = []
    if config_file:
        chain = config_chain(config_file)
        for path, data in chain:
            _apply_file(cfg, path, data, set_by, notes)
        cfg.job.config_file = config_file
        set_by["job.config_file"] = config_origin
    for key, value in overrides:
        canonical = _set(cfg, key, value, from_cli=True, notes=notes)
        if canonical is not None:
            set_by[canonical] = "cli"
    _olmo_defaults(cfg, overrides, set_by, [path for path, _ in chain] if config_file else [])
    cfg.set_by = MappingProxyType(set_by)
    cfg.notes = tuple(dict.fromkeys(notes))
    return cfg


def _olmo_defaults(cfg: JobConfig, overrides: list[tuple[str, str]], set_by: dict[str, str],
                   chain: list[str]) -> None:
    """What OLMo's keys imply: token files (data.paths, memmap_paths or [[data.sources]]) set later than
    data.dataset (a file after the file it extends, or the command line) or without it mean memmap data; OLMo's
    --load_path resumes the whole trainer state (--reset_trainer_state then keeps weights and optimizer moments)."""
    def rank(key: str) -> int:
        origin = set_by.get(key)
        return -1 if origin is None else len(chain) if origin == "cli" else chain.index(origin)

    d = cfg.data
    files_at = max(rank("data.memmap_paths"), rank("data.sources"))
    if files_at >= 0 and files_at > rank("data.dataset"):
        d.dataset = "memmap"
    if any(k == "load_path" for k, _ in overrides) and "checkpoint.initial_load_model_only" not in set_by:
        cfg.checkpoint.initial_load_model_only = False


def toml_value(v) -> str:
    """One value in TOML syntax (scalars, lists of them, and inline tables for [[data.sources]])."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: JobConfig, origins: bool = False) -> str:
    """The resolved config as TOML (what --job.print_config shows); with origins, each value is followed by
    where it came from: default, a file, or the command line."""
    out = []
    for section, values in asdict(cfg).items():
        out.append(f"[{section}]")
        for k, v in values.items():
            line = f"# {k} is unset" if v is None else f"{k} = {toml_value(v)}"
            if origins:
                origin = cfg.set_by.get(f"{section}.{k}", "default")
                line = f"{line:<60}  # {'command line' if origin == 'cli' else origin}"
            out.append(line)
        out.append("")
    return "\n".join(out)


def iter_fields():
    """(section, name, type, default, help, choices) for docs generation."""
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            yield section, f.name, hints[f.name], default, f.metadata.get("help", ""), f.metadata.get("choices")


assert all(is_dataclass(c) for c in _sections().values())

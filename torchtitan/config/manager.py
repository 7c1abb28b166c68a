"""Build a JobConfig from defaults, a TOML file and command-line overrides.

Precedence is CLI > TOML > defaults. Every problem is a ConfigError with one
line naming the key or file and what is valid; `train.py` prints it and exits
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

from torchtitan.config.effects import check_effects
from torchtitan.config.job_config import ALIASES, JobConfig
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


def _convert(key: str, raw: Any, tp, from_cli: bool) -> Any:
    """Convert a TOML value or CLI string to the field's type, or raise ConfigError."""
    base, optional = _unwrap_optional(tp)
    if optional and (raw is None or (from_cli and isinstance(raw, str) and raw.lower() in ("none", "null"))):
        return None
    if typing.get_origin(base) is list:
        (elem,) = typing.get_args(base)
        if isinstance(raw, str):
            items = [s.strip() for s in raw.split(",") if s.strip()] if from_cli else None
            if items is None:
                raise ConfigError(f"{key}: expected a list of {elem.__name__}, got {raw!r}")
        elif isinstance(raw, list):
            items = raw
        else:
            raise ConfigError(f"{key}: expected a list of {elem.__name__}, got {raw!r}")
        return [_convert(key, x, elem, from_cli) for x in items]
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if from_cli and isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if base in (int, float):
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


def _set(cfg: JobConfig, key: str, raw: Any, from_cli: bool) -> str:
    """Set one key; returns its canonical name."""
    key = _canonical_key(key)
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


def load_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> JobConfig:
    """Resolve the job config from CONFIG/CONFIG_FILE, --job.config_file and overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    overrides = parse_cli(argv)
    config_file = env.get("CONFIG") or env.get("CONFIG_FILE") or None
    for key, value in overrides:
        if key == "job.config_file":
            config_file = value
    cfg = JobConfig()
    set_by: dict[str, str] = {}
    if config_file:
        data = _load_toml(config_file)
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{config_file}: top-level '{section}' must be a [section] table")
            for name, raw in values.items():
                try:
                    set_by[_set(cfg, f"{section}.{name}", raw, from_cli=False)] = "file"
                except ConfigError as e:
                    raise ConfigError(f"{config_file}: {e}") from None
        cfg.job.config_file = config_file
    for key, value in overrides:
        set_by[_set(cfg, key, value, from_cli=True)] = "cli"
    cfg.set_by = MappingProxyType(set_by)
    validate(cfg)
    check_effects(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Cross-field checks that need no process group."""
    t, p = cfg.training, cfg.parallelism
    v = cfg.validation
    for key, n in (("training.local_batch_size", t.local_batch_size), ("training.seq_len", t.seq_len),
                   ("training.steps", t.steps), ("metrics.log_freq", cfg.metrics.log_freq),
                   ("validation.freq", v.freq), ("validation.seq_len", v.seq_len),
                   ("validation.local_batch_size", v.local_batch_size)):
        if n < 1:
            raise ConfigError(f"{key} must be >= 1, got {n}")
    if t.spike_guard_sigma < 0 or t.spike_guard_window < 2:
        raise ConfigError(f"training.spike_guard_sigma must be >= 0 and training.spike_guard_window >= 2, got "
                          f"{t.spike_guard_sigma} and {t.spike_guard_window}")
    if v.steps == 0 or v.steps < -1:
        raise ConfigError(f"validation.steps must be -1 (the whole set) or >= 1, got {v.steps}")
    for key in ("data_parallel_replicate_degree", "tensor_parallel_degree", "pipeline_parallel_degree",
                "context_parallel_degree", "pipeline_parallel_microbatch_size"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallelism.{key} must be >= 1, got {getattr(p, key)}")
    if p.data_parallel_shard_degree == 0 or p.data_parallel_shard_degree < -1:
        raise ConfigError("parallelism.data_parallel_shard_degree must be -1 or >= 1, got "
                          f"{p.data_parallel_shard_degree}")
    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option != "op":
        if not ac.selective_ac_option.isdigit() or int(ac.selective_ac_option) < 1:
            raise ConfigError("activation_checkpoint.selective_ac_option must be 'op' or a positive integer, got "
                              f"{ac.selective_ac_option!r}")
    for c in cfg.compile.components:
        if c not in ("model", "loss"):
            raise ConfigError(f"compile.components: {c!r} is not one of model, loss")
    if cfg.checkpoint.keep_latest_k < 0:
        raise ConfigError(f"checkpoint.keep_latest_k must be >= 0, got {cfg.checkpoint.keep_latest_k}")
    if p.pipeline_parallel_schedule == "CSV" and not p.pipeline_parallel_schedule_csv:
        raise ConfigError("parallelism.pipeline_parallel_schedule = CSV needs "
                          "parallelism.pipeline_parallel_schedule_csv")


def to_toml(cfg: JobConfig) -> str:
    """Render the resolved config as TOML (what --job.print_config shows)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    out = []
    for section, values in asdict(cfg).items():
        out.append(f"[{section}]")
        for k, v in values.items():
            if v is None:
                out.append(f"# {k} is unset")
            else:
                out.append(f"{k} = {fmt(v)}")
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

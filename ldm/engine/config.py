"""Typed configuration, for any trainer: defaults live in dataclasses, YAML presets and ``key=value`` overrides
change them, and every value is checked once before any I/O.

    cfg = load_config(LDMConfig, "configs/ldm/shapes.yaml", ["train.max_steps=100", "name=quick"])

Unknown keys are errors (a typo must not silently train with a default). The resolved config is written to the
run folder and into every checkpoint by the engine; `config_differences` says what changed between two of them.
`Checker` collects the value checks of one config, each failure naming the key, the value and what is valid."""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # config name -> diffusers' name
LRSchedule = typing.Literal[tuple(LR_SCHEDULES)]
MixedPrecision = typing.Literal["no", "bf16", "fp16"]
OnNonfinite = typing.Literal["stop", "skip_step"]


@dataclass
class EngineSettings:
    """What the run engine (`ldm.engine.engine.Engine`) reads of a run: both trainers' ``train`` sections extend
    this class with their own settings, and may give these other defaults."""

    seed: int = 0
    batch_size: int = 64  # global batch per optimizer step, split across processes and accumulation steps
    max_steps: int = 2000
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_schedule: LRSchedule = "cosine"  # after warm-up
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: MixedPrecision = "no"  # handed to Accelerate; fp16 uses loss scaling
    ema_decay: float | None = None  # EMA of the trained weights (diffusers EMAModel), exported when on; None = off
    log_every: int = 25
    checkpoint_every: int = 0  # full training state every N steps and at the end; 0: none
    keep_last: int | None = 2  # checkpoints kept (older ones are removed after a new one is complete)
    resume: str | None = None  # "latest" or a checkpoint folder (a missing folder is an error)
    allow_config_change: bool = False  # resume although the checkpoint's config differs (beyond run length)
    overwrite: bool = False  # start afresh in a run folder that holds another run (its checkpoints are removed)
    on_nonfinite: OnNonfinite = "stop"  # a NaN/inf loss or gradient: stop (save nothing after it) | skip_step
    num_workers: int = 0  # data-loading workers
    tensorboard: bool = True  # also write metrics (and sample grids) to <run>/tensorboard


@dataclass
class RunConfig:
    """A run's name and where its folder goes. Both trainers' configs extend it with their sections, one of them
    ``train``, which extends `EngineSettings`."""

    name: str = "run"
    output_dir: str = "runs"
    # Settings that may change between a checkpoint and its resumption: how long and how the run is executed and
    # logged, not what it computes. A trainer's config adds its own.
    RUN_SETTINGS: typing.ClassVar[tuple[str, ...]] = (
        "name", "output_dir", "train.max_steps", "train.resume", "train.allow_config_change", "train.overwrite",
        "train.checkpoint_every", "train.keep_last", "train.log_every", "train.tensorboard", "train.num_workers",
        "train.on_nonfinite")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class Raw(str):
    """An override's text, parsed once its field's type is known: ``train.mixed_precision=no`` stays the
    string "no" (YAML alone would read false) and ``train.learning_rate=1e-5`` becomes a float."""


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(key: str, value, typ):
    """Return ``value`` if it fits ``typ`` (ints accepted for floats), else raise naming the key."""
    origin = typing.get_origin(typ)
    if isinstance(value, Raw) and origin is not typing.Literal:
        value = _parse_override(value, typ)
        if isinstance(value, Raw):
            return str(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        except ValueError:
            pass
    if origin is typing.Literal:
        return _check_literal(key, value, typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return _check_union(key, value, typ)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(typ):  # a list's entries: a section each
        return from_dict(typ, value, f"{key}.")
    return _check_scalar(key, value, typ)


def _parse_override(value: Raw, typ):
    """An override's text as YAML, or the text itself (still a `Raw`) where ``typ`` takes a string."""
    takes_str = typ is str or (typing.get_origin(typ) in (typing.Union, types.UnionType)
                               and str in typing.get_args(typ) and value.strip() not in ("null", "~", "None"))
    if takes_str:
        return value
    return yaml.safe_load(value) if value != "" else ""


def _check_literal(key: str, value, valid: tuple):
    if isinstance(value, Raw):
        value = str(value)
    if not any(value == v and type(value) is type(v) for v in valid):
        raise ValueError(f"{key}={value!r} is not one of {list(valid)}")
    return value


def _check_union(key: str, value, typ):
    """The first of the union's types that ``value`` fits; an error naming the valid choices otherwise."""
    errors = []
    for arg in typing.get_args(typ):
        try:
            return _check_value(key, value, arg)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    literal = next((e for e in errors if " is not one of " in e), None)
    raise ValueError(literal.replace("is not one of", "is not null or one of") if literal
                     else f"{key}: {value!r} is not a valid {typ}")


def _check_scalar(key: str, value, typ):
    if typ is type(None):
        if value is None:
            return None
        raise ValueError(f"{key}: expected None, got {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if typ is int and isinstance(value, bool):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                         f"valid keys here: {sorted(prefix + k for k in types_)}")
    kwargs = {}
    for key, value in data.items():
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, prefix + key + ".")
        else:
            kwargs[key] = _check_value(prefix + key, value, typ)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=100", "sample.seeds=[1,2]"]`` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = Raw(raw)
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults of ``cls`` <- YAML preset at ``path`` <- ``key=value`` overrides."""
    data = dataclasses.asdict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            preset = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        data = _merge(data, preset)
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


_ABSENT = object()


def config_differences(old: dict, new: dict, defaults: dict | None = None, run_settings: tuple[str, ...] = (),
                       prefix: str = "") -> list[str]:
    """"key: old -> new" for every setting that differs, leaving out ``run_settings`` (a config class's
    ``RUN_SETTINGS``). A key the old config does not have (written before the setting existed) counts as its
    default from ``defaults``."""
    out, defaults = [], defaults or {}
    for key in sorted(set(old) | set(new)):
        name = prefix + key
        if name in run_settings:
            continue
        a, b, d = old.get(key, _ABSENT), new.get(key, _ABSENT), defaults.get(key, _ABSENT)
        if a is _ABSENT:
            a = d
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, d if isinstance(d, dict) else {}, run_settings, name + ".")
        elif a != b:
            show = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
            out.append(f"{name}: {show(a)} -> {show(b)}")
    return out


# ----------------------------------------------------------------------------------------------
# Value checks: every setting is checked here, once, before any data is read or model built
# ----------------------------------------------------------------------------------------------

class Checker:
    """Collects the checks of one config; each failure names the key, the value and what is valid."""

    def __init__(self, cfg):
        self.cfg = cfg

    def get(self, key: str):
        """The value at a dotted key; ``name[k]`` takes entry k of a list."""
        node = self.cfg
        for part in key.split("."):
            name, _, index = part.partition("[")
            node = getattr(node, name)
            if index:
                node = node[int(index.rstrip("]"))]
        return node

    def require(self, ok: bool, key: str, valid: str) -> None:
        if not ok:
            raise ValueError(f"{key}={self.get(key)!r} is not valid: {valid}")

    def at_least(self, key: str, low, optional: bool = False) -> None:
        v = self.get(key)
        if optional and v is None:
            return
        self.require(v is not None and math.isfinite(v) and v >= low, key, f"needs a finite number >= {low}"
                     + (" or null" if optional else ""))

    def positive(self, key: str, optional: bool = False) -> None:
        v = self.get(key)
        if optional and v is None:
            return
        self.require(v is not None and math.isfinite(v) and v > 0, key,
                     "needs a finite number > 0" + (" or null" if optional else ""))

    def within(self, key: str, low, high, closed_low: bool = True, closed_high: bool = False,
               optional: bool = False) -> None:
        v = self.get(key)
        if optional and v is None:
            return
        ok = v is not None and math.isfinite(v) and (v >= low if closed_low else v > low) and \
            (v <= high if closed_high else v < high)
        self.require(ok, key, f"needs a number in {'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
                     + (" or null" if optional else ""))

    def seed(self, key: str) -> None:
        v = self.get(key)
        self.require(0 <= v < 2**32, key, "needs an integer in [0, 2**32) (numpy's seed range)")


def warn_long_warmup(warmup, max_steps) -> bool:
    """Warn when the learning-rate warm-up takes half the run or more (a preset's warm-up kept when the run was
    cut short): the rate spends the run below what train.learning_rate asks, and never gets there when the
    warm-up is longer than the run."""
    if not (isinstance(warmup, int) and isinstance(max_steps, int) and max_steps >= 1 and 2 * warmup >= max_steps):
        return False
    reach = "never reaches train.learning_rate: it gets to " + f"{max_steps / warmup:.0%} of it" if warmup > max_steps \
        else f"reaches train.learning_rate only at step {warmup}"
    logging.getLogger(__name__).warning(
        "train.warmup_steps=%d against train.max_steps=%d: the learning rate %s; set train.warmup_steps to a small part "
        "of the run (e.g. %d)", warmup, max_steps, reach, max(max_steps // 20, 1))
    return True


def check_engine_settings(c: Checker) -> None:
    """The engine's settings (`EngineSettings`), common to both trainers."""
    c.seed("train.seed")
    c.at_least("train.batch_size", 1)
    c.at_least("train.max_steps", 1)
    c.positive("train.learning_rate")
    c.at_least("train.warmup_steps", 0)
    warn_long_warmup(c.get("train.warmup_steps"), c.get("train.max_steps"))
    c.at_least("train.weight_decay", 0)
    c.at_least("train.max_grad_norm", 0)
    c.at_least("train.log_every", 1)
    c.at_least("train.checkpoint_every", 0)
    c.at_least("train.keep_last", 1, optional=True)
    c.at_least("train.num_workers", 0)
    c.within("train.ema_decay", 0, 1, closed_low=False, optional=True)
    resume = c.get("train.resume")
    c.require(resume is None or resume.strip() != "", "train.resume", "'latest', a checkpoint folder, or null")

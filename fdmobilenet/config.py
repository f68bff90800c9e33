"""Typed configuration: the authors' four config families (data, model, optim, sched) plus the run settings.

The dataclasses below are the schema: every key, its type, its default and, as ``typing.Literal``, its
choices. Files are YAML (the authors' JSON files are YAML too) and live in ``configs/{family}/`` inside this
package, so an installed copy resolves names as a checkout does. A family file states only what differs from
the defaults, or from the file it names as ``base:``. An experiment file composes the four families (each a
name, a path or an inline mapping) and a ``train`` section; any field can be overridden from the command line
as ``section.key=value``. Loading checks every key and type and names the file, the key, what was expected
and what was given.

The checks are this module's own rather than OmegaConf's (why: README, "Configs").
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"   # package data: installed copies have it too
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RES_STEP = 32   # FD-MobileNet's total stride: the sizes of a resolution ramp are its multiples


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and what was expected."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's numbers and booleans. PyYAML follows YAML 1.1, where a float needs a dot
    (``4e-05``, what ``json.dump`` writes, would arrive as a string, so a JSON config would not be valid YAML
    after all) and where on/off/yes/no are booleans (``compile: off`` would arrive as False, not 'off')."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                   for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _parse_yaml(text_or_stream: Any) -> Any:
    return yaml.load(text_or_stream, Loader=_Loader)


@dataclass
class ResolutionRamp:
    """``data.train_res``: the training resolution grows over the epochs to ``data.crop_size`` (FFCV's
    progressive resizing): ``start_res`` px up to epoch ``ramp_start``, then linearly, in steps of 32 px,
    to ``data.crop_size`` at epoch ``ramp_end`` and after. Epochs are counted from 1, as in the logs."""
    start_res: int
    ramp_start: int
    ramp_end: int
    form: typing.ClassVar[str] = ("a mapping like {start_res: 160, ramp_start: 24, ramp_end: 28} (or null: one size, "
                                  "data.crop_size, every epoch)")

    def problem(self) -> str:
        """What is wrong with these values, or ''."""
        if self.start_res < RES_STEP or self.start_res % RES_STEP:
            return f"start_res must be a positive multiple of {RES_STEP} (the network's stride), got {self.start_res}"
        if not 1 <= self.ramp_start < self.ramp_end:
            return (f"expected 1 <= ramp_start < ramp_end (epochs, counted from 1), got ramp_start "
                    f"{self.ramp_start}, ramp_end {self.ramp_end}")
        return ""

    def at(self, epoch: int, end_res: int) -> int:
        """The resolution of ``epoch`` (counted from 0, as in the code) on the way to ``end_res``."""
        n = epoch + 1
        if n <= self.ramp_start:
            return self.start_res
        if n >= self.ramp_end:
            return end_res
        res = self.start_res + (end_res - self.start_res) * (n - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return RES_STEP * math.floor(res / RES_STEP + 0.5)   # the nearest multiple, halves up


@dataclass
class DataConfig:
    """Where the images are, how they are augmented, and how the loader is tuned."""
    name: str = "imagenet-aggressive"
    root: str = "data/imagenet"            # holds {train_split}/ and {val_split}/ (ImageFolder) or shards
    layout: Literal["folder", "webdataset"] = "folder"   # ImageFolder JPEG tree | tar shards + index
    train_split: str = "train"
    val_split: str = "val"
    # auto: the number of class folders of the train split (ImageNet's tree: 1000), pipelines.splits
    num_classes: int | Literal["auto"] = "auto"
    loader: Literal["dali", "torchvision", "synthetic"] = "dali"
    # training augmentation
    train_crop: Literal["random_resized", "random"] = "random_resized"   # Inception-style | resize, random crop
    crop_size: int = 224                   # training resolution (with train_res: the one the ramp ends at)
    train_res: Optional[ResolutionRamp] = None   # null: every epoch at crop_size
    scale: tuple[float, float] = (0.36, 1.0)           # RandomResizedCrop area range ("aggressive")
    ratio: tuple[float, float] = (3 / 4, 4 / 3)        # RandomResizedCrop aspect-ratio range
    train_resize: int = 256                # shorter side before the random crop (train_crop: random)
    hflip: bool = True
    color_jitter: Optional[tuple[float, float, float, float]] = None  # brightness, contrast, saturation, hue
    # evaluation preprocessing, independent of the training resolution (e.g. test at 256 after training at 192)
    val_resize: int = 256                  # shorter side
    val_crop: int = 224                    # center crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # loader speed knobs; auto: chosen for this rank's GPU and CPUs (pipelines/defaults.py)
    num_threads: int | Literal["auto"] = "auto"          # DALI CPU threads, or DataLoader workers
    prefetch_queue_depth: int | Literal["auto"] = "auto"
    hw_decoder_load: float | Literal["auto"] = "auto"    # share of JPEGs for the hardware decoder (A100, H100)
    preallocate_width_hint: int = 0        # 0 = DALI's default
    preallocate_height_hint: int = 0
    dont_use_mmap: bool = False
    seed: int = 42
    # images handed over: auto (float16 on GPU, float32 on CPU)
    dtype: Literal["auto", "float16", "float32"] = "auto"
    on_corrupt: Literal["error", "skip"] = "error"   # stop naming the file | drop unreadable files up front

    def train_size(self, epoch: int) -> int:
        """The training resolution of ``epoch`` (counted from 0): crop_size, or where train_res has got to."""
        return self.crop_size if self.train_res is None else self.train_res.at(epoch, self.crop_size)


@dataclass
class ModelConfig:
    """Which FD-MobileNet: its width and dropout (the input size is the data's crop_size)."""
    name: str = "1x-FDMobileNet-224"
    width_mult: float = 1.0
    dropout: float = 0.0


@dataclass
class OptimConfig:
    """SGD (the paper's optimizer) and what goes with it."""
    name: str = "SGD-120-nesterov"
    lr: float = 0.1                        # for batch_size below; scaled linearly for other global batches
    momentum: float = 0.9
    weight_decay: float = 4e-5
    nesterov: bool = True
    epochs: int = 120
    batch_size: int = 256                  # global batch (all ranks together)
    base_batch_size: int = 256             # the batch that `lr` is meant for (linear scaling rule)
    # auto: fused on CUDA, foreach on CPU
    impl: Literal["auto", "fused", "foreach", "plain", "apex"] = "auto"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    no_wd_bn_bias: bool = False            # the paper decays every parameter
    ema_decay: float = 0.0                 # 0 = no EMA (the paper); e.g. 0.9998 with torch.optim.swa_utils


@dataclass
class SchedConfig:
    name: str = "StepLR-30-0.1"
    type: Literal["step", "cosine"] = "step"
    step_size: int = 30                    # epochs
    gamma: float = 0.1
    min_lr: float = 0.0                    # cosine floor


@dataclass
class TrainConfig:
    """Run settings: output, speed switches, logging. Not part of the authors' configs."""
    label: str = "run"
    output_dir: str = "checkpoints"
    print_freq: int = 100
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # auto: bf16 on GPUs that have it, else fp16; off on CPU
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: Literal["auto", "on", "off"] = "auto"       # auto: on for CUDA
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # torch.compile backend (aot_eager: no C++/Triton builds, for smoke runs)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # input shapes of the compiled model: off = static, one graph per image size (a data.train_res ramp, the
    # val size); on = dynamic, one graph for all; auto = torch's default (static, dynamic after a change)
    compile_dynamic: Literal["auto", "on", "off"] = "off"
    # the training step as one CUDA graph (fdmobilenet/cuda_graph.py); auto: off until measured faster
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    save_every_steps: int = 0              # 0 = once per epoch
    auto_resume: bool = True               # continue from checkpoints/{label}.pth.tar when it exists
    deterministic: bool = False
    steps_per_epoch: int = 0               # 0 = the whole train set; >0 caps an epoch (smoke runs, benchmarks)
    val_steps: int = 0                     # 0 = the whole val split; >0 scores only the first N batches per rank
    eval_every: int = 1                    # epochs between validations (0 = only at the end)
    plot: bool = True                      # PNG of loss / top-1 / lr at the end
    # hung ranks (fdmobilenet/watchdog.py): a rank whose loop iteration (batch, step, logging, step checkpoint)
    # takes longer is killed and the job ends or restarts (0 = off); the first step of a process
    # (torch.compile, warm-up) gets its own allowance (0 = not timed)
    step_timeout_s: float = 300.0
    first_step_timeout_s: float = 1800.0


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


FAMILIES: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                             "sched": SchedConfig, "train": TrainConfig}

# Numbers that must be positive whatever their type allows: checked wherever a value comes in (a file, an
# override, a run's stored config), so that the model is never built with them.
POSITIVE: dict[tuple[str, str], str] = {("model", "width_mult"): "a width multiplier",
                                        ("data", "num_classes"): "a class count"}


def choices(cls: type, key: str) -> tuple[str, ...]:
    """The values a ``Literal`` field takes, e.g. ``choices(TrainConfig, 'amp')``."""
    return typing.get_args(typing.get_type_hints(cls)[key])


# ----------------------------------------------------------------------------------------------- type checks
_SCALARS = {float: "a number (float)", int: "an integer", bool: "true or false", str: "a string"}


def _describe(tp: Any) -> str:
    """What a value of annotation ``tp`` looks like, in the words of the error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {len(args)} {args[0].__name__}s"
    if dataclasses.is_dataclass(tp):
        return tp.form
    return _SCALARS[tp]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:                  # whatever the value's type: `compile: false` is a choice missed
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(args)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:              # Optional[X]: X's own message
            return _coerce(value, members[0], where)
        for member in members:             # e.g. int or 'auto': the first member that takes the value
            try:
                return _coerce(value, member, where)
            except ConfigError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in _SCALARS:
        # bool is an int subclass: `epochs: true` is not an integer
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
    elif dataclasses.is_dataclass(tp):
        return _record(value, tp, where)
    else:
        raise TypeError(f"unsupported annotation {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _record(value: Any, tp: type, where: str) -> Any:
    """A small dataclass written as a mapping of all its fields (e.g. data.train_res); each field is checked
    like a key, then the values together (``tp.problem()``)."""
    if isinstance(value, tp):              # already built (dataclasses.replace of a loaded config)
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected {tp.form}, got {value!r} ({type(value).__name__})")
    hints = {f.name: typing.get_type_hints(tp)[f.name] for f in dataclasses.fields(tp)}
    for key in value:
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{key}'{_did_you_mean(key, hints)}; expected {tp.form}")
    missing = [key for key in hints if key not in value]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}; expected {tp.form}")
    prefix = where.removesuffix("'")      # "...: key 'data.train_res'" -> "...: key 'data.train_res.start_res'"
    record = tp(**{key: _coerce(value[key], hints[key], f"{prefix}.{key}'") for key in hints})
    problem = record.problem()
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return record


def check_data(data: DataConfig) -> None:
    """What the data keys must satisfy together, once a config is composed (overrides come one by one)."""
    if data.train_res is None:
        return
    if data.crop_size < RES_STEP or data.crop_size % RES_STEP:
        below = max(RES_STEP, data.crop_size // RES_STEP * RES_STEP)
        raise ConfigError(f"data.train_res ramps to data.crop_size, which must then be a positive multiple of "
                          f"{RES_STEP}, got {data.crop_size}: use e.g. {below} or {below + RES_STEP}, or "
                          f"data.train_res=null for one size every epoch")
    if data.train_crop != "random_resized":
        raise ConfigError(f"data.train_res needs data.train_crop=random_resized (its crop is relative to the "
                          f"image); train_crop={data.train_crop} crops a fixed size out of data.train_resize")


def _mapping(raw: Any, source: str, section: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values, "
                          f"got {type(raw).__name__}")
    return raw


def build(cls: type, mapping: Any, source: str, section: str, start: Any = None) -> Any:
    """Dataclass ``cls`` from ``mapping``, on top of the instance ``start`` (else the defaults); every error
    names ``source`` and ``section.key``."""
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in _mapping(mapping, source, section).items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{_did_you_mean(key, hints)}; "
                              f"valid keys for {section}: {', '.join(hints)}")
        values[key] = _coerce(value, hints[key], f"{source}: key '{section}.{key}'")
        number = values[key]
        if (section, key) in POSITIVE and not isinstance(number, str) and not 0 < number < math.inf:
            raise ConfigError(f"{source}: key '{section}.{key}': {POSITIVE[section, key]} must be positive, "
                              f"got {number!r}")
    return dataclasses.replace(start, **values) if start is not None else cls(**values)


def _did_you_mean(word: Any, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------------------------------- loading
def _not_found(path: Path, family: str | None) -> str:
    """The message for a missing file; for a ``family`` reference, with the nearest shipped names."""
    where = CONFIG_DIR / family if family else CONFIG_DIR
    shipped = sorted(f.stem for f in where.glob("*.yaml")) if family else []
    close = difflib.get_close_matches(path.name, shipped, n=3, cutoff=0.6)
    return (f"config file not found: {path} (give a path to a .yaml/.json file, or a name from {where})"
            + (f"; nearest names: {', '.join(close)}" if close else ""))


def read_yaml(path: str | os.PathLike, family: str | None = None) -> Any:
    """Read a YAML/JSON file; a missing or malformed file is a ConfigError naming it (and, for a ``family``
    reference, the nearest names shipped in configs/{family}/)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(_not_found(p, family))
    try:
        with open(p) as f:
            return _parse_yaml(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML/JSON: {e}") from e


def resolve_path(ref: str, family: str, base: Path | None = None) -> Path:
    """A family reference is a path (absolute, relative to cwd or to the referring file) or a bare name in
    configs/{family}/ (e.g. ``imagenet-aggressive``)."""
    candidates = [Path(ref)]
    if base is not None:
        candidates.append(base / ref)
    for ext in ("", ".yaml", ".yml", ".json"):
        candidates.append(CONFIG_DIR / family / f"{ref}{ext}")
    for c in candidates:
        if c.is_file():
            return c
    return Path(ref)  # read_yaml reports it as missing


def load_family(family: str, ref: str | dict, base: Path | None = None, source: str | None = None,
                _chain: tuple[Path, ...] = (), start: Any = None) -> Any:
    """A family from a file reference, or from an inline mapping found in ``source`` (the experiment file).
    Either may name a ``base`` (a reference resolved like ``ref``, next to it): its values come first;
    without one, an inline mapping's values go on top of ``start`` (the section of the experiment's base)."""
    if isinstance(ref, dict):
        where, mapping = f"{source or 'inline'} (inline '{family}' section)", ref
    else:
        path = resolve_path(ref, family, base)
        where, mapping = str(path), read_yaml(path, family)
        base, _chain = path.parent, (*_chain, path.resolve())     # its base is resolved beside it
    mapping = dict(_mapping(mapping, where, family))
    start = start if isinstance(ref, dict) else None
    if "base" in mapping:
        parent = mapping.pop("base")
        key = f"{where}: key '{family}.base'"
        if not isinstance(parent, str):
            raise ConfigError(f"{key}: expected the name or path of a {family} file, got {parent!r}")
        parent_path = resolve_path(parent, family, base)
        if not parent_path.is_file():
            raise ConfigError(f"{key}: {_not_found(parent_path, family)}")
        if parent_path.resolve() in _chain:
            loop = " -> ".join(str(p) for p in (*_chain, parent_path.resolve()))
            raise ConfigError(f"{key}: the base chain loops ({loop}); a file cannot be its own base")
        start = load_family(family, str(parent_path), None, None, _chain)
    return build(FAMILIES[family], mapping, where, family, start)


def load_model_ref(ref: str) -> ModelConfig:
    """A model named on a command line: a plain width multiplier (``0.25``) or a model config (a name in
    configs/model/ or a path)."""
    try:
        width = float(ref)
    except ValueError:
        return load_family("model", ref)
    if not 0 < width < float("inf"):
        raise ConfigError(f"model '{ref}': a width multiplier must be positive (e.g. 0.25, 0.5, 1)")
    return ModelConfig(name=f"{width:g}x-FDMobileNet-224", width_mult=width)


def load_experiment(path: str | None = None, *, data: str | None = None, model: str | None = None,
                    optim: str | None = None, sched: str | None = None, overrides: list[str] = (),
                    start: ExperimentConfig | None = None) -> ExperimentConfig:
    """Compose an experiment: an optional experiment file, then family files given one by one (the authors'
    ``--data --model --optim --sched`` flags; ``model`` may be a bare width, as load_model_ref), then
    ``section.key=value`` overrides. Without a file they go on top of ``start`` (a run's saved config), else
    the defaults."""
    exp = _experiment_file(path) if path is not None else (start or ExperimentConfig())
    for section, ref in (("data", data), ("model", model), ("optim", optim), ("sched", sched)):
        if ref is not None:
            setattr(exp, section, load_model_ref(ref) if section == "model" else load_family(section, ref))
    apply_overrides(exp, overrides)
    check_data(exp.data)
    return exp


def _experiment_file(ref: str, beside: Path | None = None, _chain: tuple[Path, ...] = ()) -> ExperimentConfig:
    """An experiment file (a path, or a name in configs/experiments/). It may name another as ``base:`` (resolved
    beside it): that experiment comes first, a section given as a name or path replaces the base's, an inline
    mapping goes on top of it."""
    p = resolve_path(ref, "experiments", beside)
    raw = read_yaml(p, "experiments")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: an experiment file must be a mapping with sections {', '.join(FAMILIES)}")
    if "run" in raw:   # a run's own {label}.config.yaml (the resolved config + its run: metadata)
        return from_dict(raw, str(p))
    exp, chain = ExperimentConfig(), (*_chain, p.resolve())
    if "base" in raw:
        parent, key = raw["base"], f"{p}: key 'base'"
        if not isinstance(parent, str):
            raise ConfigError(f"{key}: expected the name or path of an experiment file, got {parent!r}")
        parent_path = resolve_path(parent, "experiments", p.parent)
        if not parent_path.is_file():
            raise ConfigError(f"{key}: {_not_found(parent_path, 'experiments')}")
        if parent_path.resolve() in chain:
            loop = " -> ".join(str(c) for c in (*chain, parent_path.resolve()))
            raise ConfigError(f"{key}: the base chain loops ({loop}); a file cannot be its own base")
        exp = _experiment_file(str(parent_path), None, chain)
    for section, ref in raw.items():
        if section == "base":
            continue
        if section not in FAMILIES:
            raise ConfigError(f"{p}: unknown section '{section}'{_did_you_mean(section, [*FAMILIES, 'base'])}; "
                              f"valid: base, {', '.join(FAMILIES)}")
        if section == "train":
            exp.train = build(TrainConfig, ref, str(p), "train", exp.train)
        elif isinstance(ref, (str, dict)):
            setattr(exp, section, load_family(section, ref, p.parent, str(p), start=getattr(exp, section)))
        else:
            raise ConfigError(f"{p}: section '{section}' must be a file name or a mapping, got {ref!r}")
    return exp


def apply_overrides(exp: ExperimentConfig, overrides: list[str]) -> None:
    """Apply ``section.key=value`` strings (value parsed as YAML: ``0.2``, ``true``, ``[0.08, 1.0]``)."""
    for item in overrides:
        where = f"command-line override '{item}'"
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"{where}: expected section.key=value, e.g. optim.lr=0.2")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in FAMILIES:
            raise ConfigError(f"{where}: unknown section '{section}'; valid: {', '.join(FAMILIES)}")
        try:
            value = _parse_yaml(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"quote strings, write lists as [a, b]") from e
        setattr(exp, section, build(FAMILIES[section], {key: value}, where, section, getattr(exp, section)))


def to_dict(exp: ExperimentConfig) -> dict:
    """Plain-data form (lists, not tuples) for YAML/JSON output and checkpoints."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(exp))


def from_dict(d: dict, source: str = "checkpoint config") -> ExperimentConfig:
    """The experiment a run stored (to_dict's form); sections other than the five are left out."""
    exp = ExperimentConfig()
    for section, cls in FAMILIES.items():
        if section in d:
            setattr(exp, section, build(cls, d[section], source, section))
    return exp


def changes(before: dict, after: dict) -> list[str]:
    """``section.key before -> after`` for every field of both stored configs (to_dict's form) that differs."""
    return [f"{section}.{key} {value!r} -> {after[section][key]!r}"
            for section, fields in before.items() if section in FAMILIES and section in after
            for key, value in fields.items() if key in after[section] and after[section][key] != value]

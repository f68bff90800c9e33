"""Typed configuration: the authors' four config families (data, model, optim, sched) plus the run settings.

Every file is YAML (the authors' JSON files are YAML too). Each family is a dataclass; loading checks every key
and type and names the file, the key and what was expected when something is wrong. An experiment file
composes the four families (each either a path to a family file or an inline mapping) and a ``train`` section;
any field can be overridden from the command line as ``section.key=value``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
class DataConfig:
    """Where the images are, how they are augmented, and how the loader is tuned."""
    name: str = "imagenet-aggressive"
    root: str = "data/imagenet"            # holds {train_split}/ and {val_split}/ (ImageFolder) or shards
    layout: str = "folder"                 # folder (ImageFolder JPEG tree) | webdataset (tar shards + index)
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 1000
    loader: str = "dali"                   # dali | torchvision | synthetic
    # training augmentation
    train_crop: str = "random_resized"     # random_resized (Inception-style) | random (resize, then random crop)
    crop_size: int = 224
    scale: tuple[float, float] = (0.36, 1.0)           # RandomResizedCrop area range ("aggressive")
    ratio: tuple[float, float] = (3 / 4, 4 / 3)        # RandomResizedCrop aspect-ratio range
    train_resize: int = 256                # shorter side before the random crop (train_crop: random)
    hflip: bool = True
    color_jitter: Optional[tuple[float, float, float, float]] = None  # brightness, contrast, saturation, hue
    # evaluation preprocessing
    val_resize: int = 256                  # shorter side
    val_crop: int = 224                    # center crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # loader speed knobs
    num_threads: int = 4                   # DALI CPU threads, or DataLoader workers
    prefetch_queue_depth: int = 2
    hw_decoder_load: float = 0.65          # share of JPEGs sent to the hardware decoder (A100/H100)
    preallocate_width_hint: int = 0        # 0 = DALI's default
    preallocate_height_hint: int = 0
    dont_use_mmap: bool = False
    seed: int = 42
    dtype: str = "auto"                    # images handed over: auto (float16 on GPU, float32 on CPU) | float16 | float32
    on_corrupt: str = "error"              # error: stop naming the file | skip: drop unreadable files up front


@dataclass
class ModelConfig:
    name: str = "1x-FDMobileNet-224"
    arch: str = "fd_mobilenet"
    width_mult: float = 1.0
    input_size: int = 224
    dropout: float = 0.0


@dataclass
class OptimConfig:
    name: str = "SGD-120-nesterov"
    optimizer: str = "sgd"
    lr: float = 0.1                        # for batch_size below; scaled linearly for other global batches
    momentum: float = 0.9
    weight_decay: float = 4e-5
    nesterov: bool = True
    epochs: int = 120
    batch_size: int = 256                  # global batch (all ranks together)
    base_batch_size: int = 256             # the batch that `lr` is meant for (linear scaling rule)
    impl: str = "auto"                     # auto (fused on CUDA, foreach on CPU) | fused | foreach | plain | apex
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    no_wd_bn_bias: bool = False            # the paper decays every parameter
    ema_decay: float = 0.0                 # 0 = no EMA (the paper); e.g. 0.9998 with torch.optim.swa_utils


@dataclass
class SchedConfig:
    name: str = "StepLR-30-0.1"
    type: str = "step"                     # step | cosine
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
    device: str = "auto"                   # auto | cuda | cpu
    amp: str = "auto"                      # auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off
    channels_last: bool = True
    compile: str = "auto"                  # auto (on for CUDA) | on | off
    compile_mode: str = "default"          # torch.compile mode: default | reduce-overhead | max-autotune
    compile_backend: str = "inductor"      # torch.compile backend (aot_eager: no C++/Triton builds, for smoke runs)
    save_every_steps: int = 0              # 0 = once per epoch
    auto_resume: bool = True               # continue from checkpoints/{label}.pth.tar when it exists
    deterministic: bool = False
    steps_per_epoch: int = 0               # 0 = the whole train set; >0 caps an epoch (smoke runs, benchmarks)
    val_steps: int = 0                     # 0 = the whole val split; >0 scores only the first N batches per rank
    eval_every: int = 1                    # epochs between validations (0 = only at the end)
    plot: bool = True                      # PNG of loss / top-1 / lr at the end


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


FAMILIES: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                             "sched": SchedConfig, "train": TrainConfig}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "layout"): ("folder", "webdataset"),
    ("data", "loader"): ("dali", "torchvision", "synthetic"),
    ("data", "train_crop"): ("random_resized", "random"),
    ("data", "dtype"): ("auto", "float16", "float32"),
    ("data", "on_corrupt"): ("error", "skip"),
    ("model", "arch"): ("fd_mobilenet",),
    ("optim", "optimizer"): ("sgd",),
    ("optim", "impl"): ("auto", "fused", "foreach", "plain", "apex"),
    ("sched", "type"): ("step", "cosine"),
    ("train", "device"): ("auto", "cuda", "cpu"),
    ("train", "amp"): ("auto", "bf16", "fp16", "off"),
    ("train", "compile"): ("auto", "on", "off"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    ("train", "compile_backend"): ("inductor", "aot_eager", "eager"),
}


# ----------------------------------------------------------------------------------------------- type checks
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} {_type_name(args[0])}s"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number (float), got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, mapping: Any, source: str, section: str) -> Any:
    """Build dataclass ``cls`` from ``mapping``; every error names ``source`` and ``section.key``."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values, "
                          f"got {type(mapping).__name__}")
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in mapping.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{hint}; "
                              f"valid keys for {section}: {', '.join(known)}")
        where = f"{source}: key '{section}.{key}'"
        allowed = CHOICES.get((section, key))
        if allowed and value not in allowed:   # before the type check: `compile=false` is a choice missed
            raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")
        values[key] = _coerce(value, hints[key], where)
    return cls(**values)


# --------------------------------------------------------------------------------------------------- loading
def read_yaml(path: str | os.PathLike, family: str | None = None) -> Any:
    """Read a YAML/JSON file; a missing or malformed file is a ConfigError naming it (and, for a ``family``
    reference, the nearest names shipped in configs/{family}/)."""
    p = Path(path)
    if not p.is_file():
        shipped = sorted(f.stem for f in (CONFIG_DIR / family).glob("*.yaml")) if family else []
        close = difflib.get_close_matches(p.name, shipped, n=3, cutoff=0.6)
        raise ConfigError(f"config file not found: {p} (give a path to a .yaml/.json file, or a name "
                          f"from {CONFIG_DIR / family if family else CONFIG_DIR})"
                          + (f"; nearest names: {', '.join(close)}" if close else ""))
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


def load_family(family: str, ref: str | dict, base: Path | None = None, source: str | None = None) -> Any:
    """A family from a file reference, or from an inline mapping found in ``source`` (the experiment file)."""
    cls = FAMILIES[family]
    if isinstance(ref, dict):
        return build(cls, ref, f"{source or 'inline'} (inline '{family}' section)", family)
    path = resolve_path(ref, family, base)
    return build(cls, read_yaml(path, family), str(path), family)


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
                    optim: str | None = None, sched: str | None = None,
                    overrides: list[str] = ()) -> ExperimentConfig:
    """Compose an experiment: an optional experiment file, then family files given one by one (the authors'
    ``--data --model --optim --sched`` flags), then ``section.key=value`` overrides."""
    exp = ExperimentConfig()
    if path is not None:
        p = resolve_path(path, "experiments")
        raw = read_yaml(p, "experiments")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: an experiment file must be a mapping with sections "
                              f"{', '.join(FAMILIES)}")
        for section, ref in raw.items():
            if section == "run":   # what the trainer records in {label}.config.yaml: that file works as --config
                continue
            if section not in FAMILIES:
                close = difflib.get_close_matches(str(section), list(FAMILIES), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{p}: unknown section '{section}'{hint}; valid: {', '.join(FAMILIES)}")
            if section == "train":
                setattr(exp, section, build(TrainConfig, ref, str(p), "train"))
            elif isinstance(ref, (str, dict)):
                setattr(exp, section, load_family(section, ref, p.parent, str(p)))
            else:
                raise ConfigError(f"{p}: section '{section}' must be a file name or a mapping, got {ref!r}")
    for section, ref in (("data", data), ("model", model), ("optim", optim), ("sched", sched)):
        if ref is not None:
            setattr(exp, section, load_family(section, ref))
    apply_overrides(exp, overrides)
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
        current = dataclasses.asdict(getattr(exp, section))
        try:
            current[key] = _parse_yaml(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"quote strings, write lists as [a, b]") from e
        setattr(exp, section, build(FAMILIES[section], current, where, section))


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
    exp = ExperimentConfig()
    for section, cls in FAMILIES.items():
        if section in d:
            setattr(exp, section, build(cls, d[section], source, section))
    return exp


def dump_yaml(exp: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(exp), sort_keys=False)

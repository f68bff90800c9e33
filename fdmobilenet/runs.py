"""A training run read back from what it wrote (fdmobilenet.logs and the checkpoint), finished or in progress.

Per label, in the run's train.output_dir: ``{label}.config.yaml`` (the resolved config, its ``run:`` section
holding git commit, command, device, world size; written when the run starts), ``{label}.jsonl`` (one row of
named metrics per epoch) and ``{label}.pth.tar`` (the latest checkpoint).

Nothing here depends on a row's ``epoch`` value (whether it counts from 0 or 1): the epochs completed are the
checkpoint's ``epoch`` (the number of completed epochs; with ``step_in_epoch`` > 0 the run stopped inside the
next one), or the number of rows while no checkpoint exists; the epochs planned are ``optim.epochs``.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from fdmobilenet.checkpoint import BEST_SUFFIX, CheckpointSaver, load_checkpoint
from fdmobilenet.config import ConfigError, ExperimentConfig, from_dict, read_yaml

CONFIG_SUFFIX = ".config.yaml"


@dataclass
class Run:
    label: str
    dir: Path
    config: ExperimentConfig
    meta: dict             # the config file's run: section
    rows: list[dict]       # per-epoch metrics, in the order written
    epochs_done: int
    step_in_epoch: int     # > 0: stopped (preempted) inside epoch epochs_done + 1

    @property
    def epochs_planned(self) -> int:
        return self.config.optim.epochs

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.epochs_planned

    def values(self, key: str) -> list[float]:
        """The column ``key`` over the epochs that have it (validation can be skipped on some epochs)."""
        return [r[key] for r in self.rows if isinstance(r.get(key), (int, float))]

    def final(self, key: str) -> float | None:
        v = self.values(key)
        return v[-1] if v else None

    def best(self, key: str) -> float | None:
        v = self.values(key)
        return max(v) if v else None

    def median_img_s(self) -> float | None:
        """Median training img/s per epoch; the first epoch (compilation, warm-up) left out when there are more."""
        v = self.values("img_s")
        return statistics.median(v[1:] if len(v) > 1 else v) if v else None

    def device_hours(self) -> float:
        """Ranks x the training time of the logged epochs (evaluation not included), in hours."""
        return self.meta.get("world_size", 1) * sum(self.values("epoch_time_s")) / 3600


def read_rows(path: Path) -> list[dict]:
    """The JSON-lines rows; a last line still being written by a running job is left out."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise ConfigError(f"{path}: line {k + 1} is not JSON; the run log is damaged") from None
    return rows


def read_run(config_path: str | Path) -> Run:
    config_path = Path(config_path)
    if not config_path.name.endswith(CONFIG_SUFFIX):
        raise ConfigError(f"{config_path}: not a run's config (expected {{label}}{CONFIG_SUFFIX}, written by "
                          f"train_ddp.py when a run starts)")
    raw = read_yaml(config_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: not a run's config (a mapping with run, data, model, ... sections)")
    label, folder = config_path.name[:-len(CONFIG_SUFFIX)], config_path.parent
    rows = read_rows(folder / f"{label}.jsonl")
    ckpt_path = CheckpointSaver(folder, label).path
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        done, step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
    else:
        done, step = len(rows), 0
    return Run(label=label, dir=folder, config=from_dict(raw, str(config_path)), meta=raw.get("run") or {},
               rows=rows, epochs_done=done, step_in_epoch=step)


def saved_config(output_dir: str | Path, label: str) -> tuple[str, dict] | None:
    """The config run ``label`` was saved with, and where it came from: its {label}.config.yaml, else the
    config stored in its checkpoint; None for a label that has no files in ``output_dir``."""
    folder = Path(output_dir)
    config_path = folder / f"{label}{CONFIG_SUFFIX}"
    if config_path.is_file():
        raw = read_yaml(config_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{config_path}: not a run's config (a mapping with run, data, model, ... "
                              f"sections); remove it, or give --config")
        return str(config_path), raw
    ckpt_path = CheckpointSaver(folder, label).path
    if ckpt_path.is_file() and isinstance(stored := load_checkpoint(ckpt_path).get("config"), dict):
        return f"the config stored in {ckpt_path}", stored
    return None


def find_runs(*paths: str | Path) -> list[Run]:
    """Every run under ``paths``: a run's {label}.config.yaml, or a folder (each config file in it is a run)."""
    runs = []
    for p in map(Path, paths):
        if p.is_dir():
            configs = sorted(p.glob(f"*{CONFIG_SUFFIX}"))
            if not configs:
                raise ConfigError(f"{p}: no run here (no *{CONFIG_SUFFIX}; train_ddp.py writes "
                                  f"{{output_dir}}/{{label}}{CONFIG_SUFFIX} when a run starts)")
            runs += [read_run(c) for c in configs]
        elif p.is_file():
            runs.append(read_run(p))
        else:
            raise ConfigError(f"{p}: not found (give a run's output folder or its {{label}}{CONFIG_SUFFIX})")
    return runs


def checkpoint_run(ckpt: dict, path: str | Path) -> tuple[ExperimentConfig | None, list[str] | None]:
    """The config and class names (label order) of the run that wrote the checkpoint at ``path``: stored in
    it (this project's checkpoints), else in the run's {label}.config.yaml beside it; None for what neither
    holds (the authors' released weights hold no config; older checkpoints no class names)."""
    config = from_dict(ckpt["config"], f"config stored in {path}") if isinstance(ckpt.get("config"), dict) else None
    classes = ckpt.get("classes")
    if config is None or classes is None:
        path = Path(path)
        label = path.name.removesuffix(".pth.tar")
        for name in (label, label.removesuffix(BEST_SUFFIX)):
            beside = path.with_name(f"{name}{CONFIG_SUFFIX}")
            if beside.is_file():
                raw = read_yaml(beside)
                if isinstance(raw, dict):
                    config = config or from_dict(raw, str(beside))
                    classes = classes or (raw.get("run") or {}).get("classes")
                break
    return config, classes

"""What a training command continues from: the checkpoint it resumes (or evaluates), checked to fit before any
worker builds a loader, and the config a label was saved with.

train_ddp.py's ranks and its ``--check`` call the same functions here, so that both give the same answer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fdmobilenet.checkpoint import CONFIG_SUFFIX, CheckpointSaver, load_checkpoint, load_weights
from fdmobilenet.cli import CheckpointError, UsageError
from fdmobilenet.config import ConfigError, ExperimentConfig, changes, from_dict, read_yaml, to_dict
from fdmobilenet.model import FDMobileNet


@dataclass
class Plan:
    """What a training command is about to do."""
    config: ExperimentConfig
    world_sizes: list[int]       # the world size it will run at (an elastic job: every size it may run at)
    checkpoint: Path             # {output_dir}/{label}.pth.tar
    resume: bool = False         # --resume: the checkpoint must exist
    fresh: bool = False          # --fresh: start over even if it exists (a first start only, see restarts)
    evaluate: bool = False       # --evaluate: only score the checkpoint (it must exist)


def restarts() -> int:
    """How often the launcher has started this job again: torchrun's restarts of its workers
    (TORCHELASTIC_RESTART_COUNT) or SLURM's requeues (SLURM_RESTART_COUNT); 0 for a first start."""
    return max(int(os.environ.get(name) or 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def per_rank_batch(cfg: ExperimentConfig, world_size: int) -> int:
    """optim.batch_size is global; every rank gets an equal share."""
    if cfg.optim.batch_size % world_size:
        raise UsageError(f"optim.batch_size={cfg.optim.batch_size} (global) must divide evenly over "
                         f"{world_size} ranks; pick a multiple of {world_size}")
    return cfg.optim.batch_size // world_size


def checkpoint_to_resume(plan: Plan) -> Optional[dict]:
    """The checkpoint the run continues from (or evaluates), loaded and checked to fit; None to start fresh.

    A checkpoint that does not fit this config but would fit the config it was saved with is not a reason to
    start over: the message says how to continue it (its saved config is what train_ddp.py takes without
    --config) and, for this config, a new --label - never --fresh, which would destroy the run."""
    cfg, path = plan.config, plan.checkpoint
    label = cfg.train.label
    if plan.evaluate and not path.is_file():
        raise UsageError(f"--evaluate: no checkpoint {path} for label '{label}'; give the --label (and "
                         f"train.output_dir) of a trained run, or score any file with "
                         f"`python evaluate.py --checkpoint FILE`")
    if plan.resume and not path.is_file():
        raise UsageError(f"--resume: no checkpoint {path} for label '{label}'; give the --label (and "
                         f"train.output_dir) of a trained run, or leave out --resume to start this one")
    if not plan.evaluate and (plan.fresh or not (plan.resume or (cfg.train.auto_resume and path.is_file()))):
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:   # damaged, or not a checkpoint
        if plan.evaluate:
            raise
        raise CheckpointError(f"{e}; to train this config from scratch, start over with --fresh (overwrites "
                              f"{path}) or use a new --label") from None
    saved = from_dict(ckpt["config"], f"the config stored in {path}") if isinstance(ckpt.get("config"), dict) \
        else None
    continue_it = (f"to continue it, keep the values it was saved with (`train_ddp.py --label {label}` without "
                   f"--config takes its saved config); to train this config, use a new --label")
    try:
        load_weights(model_of(cfg), ckpt, str(path))
    except CheckpointError as e:   # the weights of another model
        if plan.evaluate:
            raise
        if saved is None or not fits(ckpt, saved):   # nothing this project saved loads it (an edited file)
            raise CheckpointError(f"{e}; to train this config from scratch, start over with --fresh (overwrites "
                                  f"{path}) or use a new --label") from None
        shape = [c for c in changes(to_dict(saved), to_dict(cfg)) if c.startswith(("model.", "data.num_classes"))]
        raise CheckpointError(f"{e} — it was saved with another config ({', '.join(shape)}): {continue_it}") from None
    if not plan.evaluate and saved is not None and saved.optim.batch_size != cfg.optim.batch_size:
        raise UsageError(f"{path} was trained with optim.batch_size={saved.optim.batch_size}; resuming with "
                         f"{cfg.optim.batch_size} would change the schedule: {continue_it}")
    return ckpt


def model_of(cfg: ExperimentConfig) -> FDMobileNet:
    return FDMobileNet(cfg.model.width_mult, num_classes=cfg.data.num_classes)


def fits(ckpt: dict, cfg: ExperimentConfig) -> bool:
    """Whether the checkpoint's weights load into the model ``cfg`` describes."""
    try:
        load_weights(model_of(cfg), ckpt, "checkpoint")
    except CheckpointError:
        return False
    return True


def nothing_left(ckpt: dict, cfg: ExperimentConfig, path: Path) -> Optional[str]:
    """The message for a run whose checkpoint has completed every epoch; None while there is work left."""
    if ckpt["epoch"] < cfg.optim.epochs:
        return None
    best = f" (best val top-1 {ckpt['best_top1']:.2f}% at epoch {ckpt['best_epoch']})"
    return (f"{path} has completed all {cfg.optim.epochs} epochs{best}: nothing left to do. Raise optim.epochs "
            f"to train on, --evaluate to score it, or --fresh to start over")


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

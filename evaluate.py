"""Evaluate an FD-MobileNet checkpoint on a validation set: top-1, top-5 and mean cross-entropy.

    python evaluate.py --data imagenet-aggressive --model 0.25x-FDMobileNet-224 \
        --checkpoint ../shared/fixtures/original/0.25x-FDMobileNet-224.pth.tar [--print-freq 10]
    torchrun --nproc_per_node=8 evaluate.py --checkpoint checkpoints/1x-FDMobileNet-224_best.pth.tar

Without --config/--data/--model the checkpoint's own config is used (this project's checkpoints record
it). Every image of {data.root}/{data.val_split} is counted once, also over several ranks.

--labels-from-folder-names scores a small folder against all of the model's outputs: the class folders are
named by output index (val/281/cat.jpg for ImageNet's tabby cat), not renumbered 0..k-1 as ImageFolder does.
"""
from __future__ import annotations

import argparse

import torch
from torchvision.datasets.folder import find_classes

import pipelines
from fdmobilenet.checkpoint import load_checkpoint, load_weights, model_state_dict, strip_prefixes
from fdmobilenet.config import ExperimentConfig, apply_overrides, from_dict, load_experiment, load_model_ref
from fdmobilenet.distributed import DistInfo, init_distributed, run_rank
from fdmobilenet.engine import evaluate, prepare_model, resolve_amp
from fdmobilenet.logs import format_metrics
from fdmobilenet.model import FDMobileNet
from pipelines.base import split_dir


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Evaluate an FD-MobileNet checkpoint (top-1 / top-5 / loss).")
    ap.add_argument("--checkpoint", required=True, help="a .pth.tar of this project or of the authors")
    ap.add_argument("--config", help="experiment file (data + model); default: the checkpoint's config")
    ap.add_argument("--data", help="data config (a path or a name in configs/data/)")
    ap.add_argument("--model", help="model config, or a width multiplier such as 0.25")
    ap.add_argument("--print-freq", type=int, default=0, help="report progress every N batches")
    ap.add_argument("--ema", action="store_true", help="evaluate the EMA weights the trainer saved (optim.ema_decay)")
    ap.add_argument("--batch-size", type=int, default=100, help="per-rank batch (default 100)")
    ap.add_argument("--labels-from-folder-names", action="store_true",
                    help="class folders are named by the model's output index (e.g. 281/), see above")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    ap.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    return ap.parse_intermixed_args(argv)


def resolve_config(args, ckpt: dict) -> ExperimentConfig:
    """--config, else the checkpoint's recorded config, else defaults; then --data/--model; then overrides."""
    if args.config:
        cfg = load_experiment(args.config)
    elif isinstance(ckpt.get("config"), dict):
        cfg = from_dict(ckpt["config"], f"config stored in {args.checkpoint}")
    else:
        cfg = ExperimentConfig()
    if args.data:
        cfg.data = load_experiment(data=args.data).data
    if args.model:
        cfg.model = load_model_ref(args.model)
    apply_overrides(cfg, [*args.set, *args.overrides])
    return cfg


def run(args, ckpt: dict, cfg: ExperimentConfig, info: DistInfo) -> None:
    # The classifier's size comes from the weights, so a 1000-class file can score a 3-folder set.
    if args.ema and not ckpt.get("ema"):
        raise ValueError(f"--ema: {args.checkpoint} holds no EMA weights (trained with optim.ema_decay=0)")
    weights = ckpt["ema"] if args.ema else model_state_dict(ckpt, args.checkpoint)
    num_classes = strip_prefixes(weights)["classifier.weight"].shape[0]
    label_map = None
    if args.labels_from_folder_names:
        classes, _ = find_classes(str(split_dir(cfg.data, "val")))
        if not all(c.isdigit() and int(c) < num_classes for c in classes):
            raise ValueError(f"--labels-from-folder-names: the class folders of {split_dir(cfg.data, 'val')} "
                             f"must be output indices below {num_classes}, got {classes[:10]}")
        cfg.data.num_classes = len(classes)
        label_map = torch.tensor([int(c) for c in classes], device=info.device)
    elif cfg.data.num_classes != num_classes:
        raise ValueError(f"{args.checkpoint} has {num_classes} outputs but data.num_classes is "
                         f"{cfg.data.num_classes}; pick the matching --data, or --labels-from-folder-names")
    module = FDMobileNet(cfg.model.width_mult, num_classes=num_classes, dropout=cfg.model.dropout)
    load_weights(module, weights, args.checkpoint)
    cfg.train.compile = "off" if cfg.train.compile == "auto" else cfg.train.compile   # one pass: no gain
    _, model = prepare_model(module, cfg.train, info)
    loader = pipelines.build_loader(cfg.data, "val", args.batch_size, rank=info.rank,
                                    world_size=info.world_size, local_rank=info.local_rank, device=info.device)
    m = evaluate(model, loader, info, resolve_amp(cfg.train.amp, info.device), args.print_freq,
                 label_map=label_map)
    if info.is_main:
        print(f"{args.checkpoint} on {split_dir(cfg.data, 'val')} ({cfg.data.loader}, "
              f"{info.world_size} rank(s), {info.device.type}): {format_metrics(m)}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = resolve_config(args, ckpt)
    info = init_distributed(cfg.train.device)
    run_rank(lambda: run(args, ckpt, cfg, info), info, "evaluation")   # an error on any rank ends the job


if __name__ == "__main__":
    main()

"""Evaluate an FD-MobileNet checkpoint on a validation set: top-1, top-5 and mean cross-entropy.

    python evaluate.py --data imagenet-aggressive --model 0.25x-FDMobileNet-224 \
        --checkpoint ../shared/fixtures/original/0.25x-FDMobileNet-224.pth.tar [--print-freq 10]
    torchrun --nproc_per_node=8 evaluate.py --checkpoint checkpoints/1x-FDMobileNet-224_best.pth.tar

Without --config/--data/--model the checkpoint's own config is used (this project's checkpoints record
it); without --model the width is the checkpoint's (its config, else its tensor shapes: the authors' files).
Every image of {data.root}/{data.val_split} is counted once, also over several ranks.

--labels-from-folder-names scores a small folder against all of the model's outputs: the class folders are
named by output index (val/281/cat.jpg for ImageNet's tabby cat), not renumbered 0..k-1 as ImageFolder does.

--predictions FILE writes every val image's label and top-1 class (model output indices) as CSV, one row
per image in the listing's order (folder layout): what ``python predict.py`` says image by image.

Exit codes: 0 scored; 2 a mistake in the command, its config or its files (one line `evaluate.py: ...`);
1 anything else (a traceback).
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from torchvision.datasets.folder import find_classes

import pipelines
from fdmobilenet import cli
from fdmobilenet.checkpoint import checkpoint_run, load_checkpoint, load_weights, model_config, model_state_dict
from fdmobilenet.cli import DataError
from fdmobilenet.config import ExperimentConfig, apply_overrides, load_experiment, load_model_ref
from fdmobilenet.distributed import DistInfo, gather_to_main, init_distributed, run_rank
from fdmobilenet.engine import evaluate, prepare_model, resolve_amp, set_cpu_threads
from fdmobilenet.logs import format_metrics
from fdmobilenet.model import FDMobileNet
from pipelines.base import split_dir
from pipelines.splits import check_split_folder

PROG = "evaluate.py"
FOLDER_NAMES_HINT = ("to score a folder of only some of the model's classes, name its class folders by the "
                     "model's output index (val/281/ for ImageNet's tabby cat) and pass --labels-from-folder-names")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog=PROG, description="Evaluate an FD-MobileNet checkpoint (top-1 / top-5 / loss).")
    ap.add_argument("--checkpoint", required=True, help="a .pth.tar of this project or of the authors")
    ap.add_argument("--config", help="experiment file (data + model); default: the checkpoint's config")
    ap.add_argument("--data", help="data config (a path or a name in configs/data/)")
    ap.add_argument("--model", help="model config, or a width multiplier such as 0.25 (default: the checkpoint's)")
    ap.add_argument("--print-freq", type=int, default=0, help="report progress every N batches")
    ap.add_argument("--ema", action="store_true", help="evaluate the EMA weights the trainer saved (optim.ema_decay)")
    ap.add_argument("--batch-size", type=int, default=100, help="per-rank batch (default 100)")
    ap.add_argument("--labels-from-folder-names", action="store_true",
                    help="the val class folders are named by the model's output index (val/281/ for ImageNet's "
                         "tabby cat): scores a folder of only some of the model's classes")
    ap.add_argument("--predictions", metavar="CSV",
                    help="write each val image's label and top-1 output index to CSV (image,label,top1)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    ap.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE")
    return ap.parse_intermixed_args(argv)


def resolve_config(args, ckpt: dict) -> ExperimentConfig:
    """--config, else the checkpoint's recorded config, else defaults with the checkpoint's width; then
    --data/--model; then overrides."""
    stored = checkpoint_run(ckpt, args.checkpoint)[0]
    if args.config:
        cfg = load_experiment(args.config)
    elif stored is not None:
        cfg = stored
    else:
        cfg = ExperimentConfig(model=model_config(ckpt, args.checkpoint)[0])
    if args.data:
        cfg.data = load_experiment(data=args.data).data
    if args.model:
        cfg.model = load_model_ref(args.model)
    apply_overrides(cfg, [*args.set, *args.overrides])
    return cfg


def check_labels(args, cfg: ExperimentConfig, num_classes: int, device: torch.device):
    """The loader label -> model output map (None: the identity). The classifier's size comes from the
    weights, so a 1000-class file can score a 3-folder set - when its folders say which classes they are."""
    folder = split_dir(cfg.data, "val")
    if args.labels_from_folder_names:
        check_split_folder(folder)
        classes, _ = find_classes(str(folder))
        if not all(c.isdigit() and int(c) < num_classes for c in classes):
            raise DataError(f"--labels-from-folder-names: the class folders of {folder} must be output indices "
                            f"below {num_classes}, got {classes[:10]}")
        cfg.data.num_classes = len(classes)
        return torch.tensor([int(c) for c in classes], device=device)
    if cfg.data.loader != "synthetic" and cfg.data.layout == "folder":
        check_split_folder(folder)
        found = len(find_classes(str(folder))[0])
        if found != num_classes:
            raise DataError(f"{folder} has {found} class folders but {args.checkpoint} has {num_classes} "
                            f"outputs; {FOLDER_NAMES_HINT}, or pick the --data of the model's data set")
    if cfg.data.num_classes == "auto":   # the folders were counted above: the model's classes
        cfg.data.num_classes = num_classes
    if cfg.data.num_classes != num_classes:
        raise DataError(f"{args.checkpoint} has {num_classes} outputs but data.num_classes is "
                        f"{cfg.data.num_classes}; pick the matching --data, or {FOLDER_NAMES_HINT}")
    return None


def run(args, ckpt: dict, cfg: ExperimentConfig, info: DistInfo) -> None:
    if args.ema and not ckpt.get("ema"):
        raise cli.UsageError(f"--ema: {args.checkpoint} holds no EMA weights (trained with optim.ema_decay=0)")
    weights = ckpt["ema"] if args.ema else model_state_dict(ckpt, args.checkpoint)
    num_classes = model_config(weights, args.checkpoint)[1]
    label_map = check_labels(args, cfg, num_classes, info.device)
    module = FDMobileNet(cfg.model.width_mult, num_classes=num_classes, dropout=cfg.model.dropout)
    load_weights(module, weights, args.checkpoint)
    cfg.data = pipelines.resolve_loader_defaults(cfg.data, info.device)[0]   # 'auto' knobs: this rank's numbers
    set_cpu_threads(cfg.data)
    cfg.train.compile = "off" if cfg.train.compile == "auto" else cfg.train.compile   # one pass: no gain
    _, model = prepare_model(module, cfg.train, info)
    loader = pipelines.build_loader(cfg.data, "val", args.batch_size, rank=info.rank, world_size=info.world_size,
                                    local_rank=info.local_rank, device=info.device, group=info.control_group)
    top1 = record_top1(model, loader, args.predictions) if args.predictions else None
    info.report_own_errors = True   # from here an error can be one rank's own (an undecodable image)
    m = evaluate(model, loader, info, resolve_amp(cfg.train.amp, info.device), args.print_freq,
                 label_map=label_map)
    if top1 is not None:
        write_predictions(args.predictions, loader, gather_to_main(torch.cat(top1).tolist(), info), label_map)
    if info.is_main:
        print(f"{args.checkpoint} on {split_dir(cfg.data, 'val')} ({cfg.data.loader}, "
              f"{info.world_size} rank(s), {info.device.type}): {format_metrics(m)}"
              + (f"; per image: {args.predictions}" if args.predictions else ""), flush=True)


def record_top1(model: torch.nn.Module, loader, path: str) -> list[torch.Tensor]:
    """The list each forward of ``model`` appends its batch's top-1 output indices to, for --predictions
    ``path`` (checked first: a folder that does not exist would fail only after the whole evaluation)."""
    if loader.split is None or not loader.split.samples:
        raise cli.UsageError("--predictions names each image: it needs the val split as image files "
                             "(data.layout=folder, data.loader dali or torchvision)")
    if not Path(path).parent.is_dir():
        raise cli.UsageError(f"--predictions {path}: the folder {Path(path).parent} does not exist")
    top1: list[torch.Tensor] = []
    model.register_forward_hook(lambda module, inputs, output: top1.append(output.argmax(dim=1)))
    return top1


def write_predictions(path: str, loader, per_rank: list | None, label_map) -> None:
    """Rank 0 writes ``path`` (replaced at once): the val images in the listing's order - the ranks' slices in
    rank order - with their label and top-1 output index."""
    if per_rank is None:
        return
    top1 = [i for rank in per_rank for i in rank]
    samples = loader.split.samples
    assert len(top1) == len(samples), f"{len(top1)} predictions for {len(samples)} images"
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "top1"])
        for (image, label), predicted in zip(samples, top1):
            writer.writerow([image, int(label_map[label]) if label_map is not None else label, predicted])
    os.replace(tmp, out)


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.exit_on_interrupt(PROG):
        with cli.exit_on_user_error(PROG):
            ckpt = load_checkpoint(args.checkpoint)
            cfg = resolve_config(args, ckpt)
        info = init_distributed(cfg.train.device)
    run_rank(lambda: run(args, ckpt, cfg, info), info, PROG, "evaluation")   # an error on any rank ends the job


if __name__ == "__main__":
    main()

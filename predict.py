"""Top-5 predictions of a trained FD-MobileNet for image files, with the names of its classes.

    python predict.py --checkpoint checkpoints/mine_best.pth.tar [--model 0.25] photo.jpg [--json]

Without --model the width and class count are the checkpoint's (its stored config, else its tensor shapes).
Images are read as the torchvision loader reads them (turned upright by their EXIF orientation, as DALI
does) and get the evaluation preprocessing of the run that trained the model: its data config's val_resize /
val_crop / mean / std, stored in the checkpoint (or in the run's {label}.config.yaml beside it). Files
without a config (the authors' released weights) get ImageNet's: shorter side 256, centre crop 224, ImageNet
mean / std. Class names: the run's class folders as stored with it; ImageNet's for a 1000-class model
without stored names (or trained on ImageNet's tree, whose folders are WordNet ids); else the output index.
Exit codes: 0; 2 an unreadable image or checkpoint (one line).
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from typing import Optional, Sequence

import torch
import torchvision
from PIL import Image
from torchvision.transforms.functional import normalize

from fdmobilenet import cli
from fdmobilenet.checkpoint import checkpoint_run, load_checkpoint, load_weights, model_config
from fdmobilenet.config import DataConfig, load_model_ref
from fdmobilenet.model import FDMobileNet
from pipelines.torchvision_loader import open_rgb, val_transform

PROG = "predict"

SAMPLE_CAT = "skimage.data.chelsea()"
TOP_K = 5
WORDNET_ID = re.compile(r"n\d{8}")   # ImageNet's class folders (n01440764, ...), in the class index order


class ImageError(ValueError):
    """An image file that cannot be read; the message names it."""


def imagenet_classes() -> list[str]:
    # torchvision ships the 1000 class names with its weight metadata (no download involved).
    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def read_image(path: str) -> Image.Image:
    try:
        return open_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: {e} (give a JPEG/PNG/... image file)") from e


def sample_cat() -> Image.Image:
    """Chelsea the cat, a photo bundled with scikit-image (the dev extra): a no-download demo input."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImageError(f"{SAMPLE_CAT} needs scikit-image: pip install -e '.[dev]'") from e
    return Image.fromarray(data.chelsea()).convert("RGB")


def load_model(checkpoint: str, model_ref: Optional[str] = None) -> tuple[FDMobileNet, DataConfig, list[str]]:
    """The checkpoint's model - ``model_ref`` (a width or a model config) or, without it, the checkpoint's -
    the data config of its evaluation preprocessing, and its class names (see the module docstring)."""
    ckpt = load_checkpoint(checkpoint)
    cfg, num_classes = model_config(ckpt, checkpoint)
    if model_ref is not None:
        cfg = load_model_ref(model_ref)
    model = FDMobileNet(cfg.width_mult, num_classes=num_classes)
    load_weights(model, ckpt, checkpoint)
    run_config, names = checkpoint_run(ckpt, checkpoint)
    return model.eval(), run_config.data if run_config else DataConfig(), class_names(num_classes, names)


def class_names(num_classes: int, stored: Optional[list[str]] = None) -> list[str]:
    """ImageNet's names for a 1000-class model without ``stored`` names or with ImageNet's WordNet-id folders;
    else the run's own names (``stored``, one per output); else the output index."""
    imagenet = num_classes == 1000 and (stored is None or all(map(WORDNET_ID.fullmatch, stored)))
    if imagenet:
        return imagenet_classes()
    if stored is not None and len(stored) == num_classes:
        return list(stored)
    return [f"class {i}" for i in range(num_classes)]


def preprocess(images: Sequence[Image.Image], data: DataConfig) -> torch.Tensor:
    """The model's input batch: the evaluation transform of ``data`` (as the torchvision val loader's)."""
    transform = val_transform(data)
    return torch.stack([normalize(transform(img).float().div(255), data.mean, data.std) for img in images])


@torch.no_grad()
def predict(model: torch.nn.Module, images: Sequence[Image.Image], data: Optional[DataConfig] = None,
            k: int = TOP_K) -> list[list[tuple[int, float]]]:
    """(class index, probability) of the ``k`` most likely classes per image; ``data`` gives the eval
    preprocessing (default: DataConfig's, i.e. ImageNet's; load_model returns the run's)."""
    probs = model(preprocess(images, data or DataConfig())).softmax(dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(int(i), float(p)) for i, p in zip(idx, prob)] for idx, prob in zip(top.indices, top.values)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python predict.py",
        description="Print the top-5 classes (index, name, probability) of each image, preprocessed as the "
                    "run that trained the checkpoint evaluated its images.")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (.pth.tar)")
    parser.add_argument("--model", help="model config (a name in configs/model/ or a path) or a plain width "
                                        "such as 0.25 (default: the checkpoint's)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    parser.add_argument("--sample-cat", action="store_true", help=f"also classify {SAMPLE_CAT} (scikit-image)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON list: [{"image": PATH, "top5": [{"index", "name", "prob"}, ...]}]')
    args = parser.parse_args(argv)
    if not args.images and not args.sample_cat:
        parser.error("give at least one IMAGE (or --sample-cat)")
    try:
        named = [(path, read_image(path)) for path in args.images]
        if args.sample_cat:
            named.append((SAMPLE_CAT, sample_cat()))
        model, data, classes = load_model(args.checkpoint, args.model)
    except (ImageError, *cli.USER_ERRORS) as e:
        cli.report(PROG, e)
        return cli.EXIT_USAGE
    results = [{"image": name, "top5": [{"index": i, "name": classes[i], "prob": p} for i, p in top]}
               for (name, _), top in zip(named, predict(model, [img for _, img in named], data))]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(result["image"])
            for entry in result["top5"]:
                print(f"  {entry['index']:4d}  {entry['prob']:.4f}  {entry['name']}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `predict.py ... | head` stops quietly, as other commands do
    sys.exit(main())

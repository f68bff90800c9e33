"""Turn a training checkpoint into a single-model file ``{'name': ..., 'state_dict': ...}``, plus the run's
``config`` and ``classes`` when it has them (predict and evaluate.py read the evaluation preprocessing and the
class names from them).

Drops what only training needs (optimizer, epoch, ...) and the ``module.`` (DDP) / ``_orig_mod.``
(torch.compile) prefixes, checks that the weights load strictly into the model named by ``--model``, and only
then writes the output (atomically). The flags are those of the FD-MobileNet authors' tool; ``--data`` and
``--label`` are accepted for compatibility and ignored. Exit codes: 0 written; 2 a checkpoint or model that
does not fit (one line, nothing written).

    python convert_model.py --model 0.25x-FDMobileNet-224 --input checkpoints/run.pth.tar --output run.pth.tar
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from fdmobilenet import cli
from fdmobilenet.checkpoint import load_checkpoint, load_weights, model_state_dict, save_checkpoint, strip_prefixes
from fdmobilenet.config import load_model_ref
from fdmobilenet.model import FDMobileNet

PROG = "convert_model.py"


def convert(input_path: str, output_path: str, model_ref: str) -> dict:
    ckpt = load_checkpoint(input_path)
    state = strip_prefixes(model_state_dict(ckpt, input_path))
    cfg = load_model_ref(model_ref)
    # The class count is not part of a model config (it belongs to the data set), so take it from the
    # classifier; everything else must match --model exactly.
    classifier = state.get("classifier.weight")
    num_classes = classifier.shape[0] if classifier is not None else 1000
    model = FDMobileNet(cfg.width_mult, num_classes=num_classes, dropout=cfg.dropout)
    load_weights(model, state, input_path)
    out = {"name": cfg.name, "state_dict": model.state_dict(),
           **{key: ckpt[key] for key in ("config", "classes") if ckpt.get(key) is not None}}
    save_checkpoint(out, output_path)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a training checkpoint to a single-model checkpoint {'name', 'state_dict'}: "
                    "strips module./_orig_mod. prefixes and verifies a strict load before writing.")
    parser.add_argument("--model", required=True,
                        help="model config (a name in configs/model/, e.g. 0.25x-FDMobileNet-224, or a path) or "
                             "a plain width multiplier such as 0.25; the weights must load strictly into it")
    parser.add_argument("--input", required=True, help="training checkpoint to convert")
    parser.add_argument("--output", required=True, help="where to write the single-model checkpoint")
    parser.add_argument("--data", help="accepted for compatibility with the authors' tool; ignored")
    parser.add_argument("--label", help="accepted for compatibility with the authors' tool; ignored")
    args = parser.parse_args(argv)
    try:
        out = convert(args.input, args.output, args.model)
    except cli.USER_ERRORS as e:
        cli.report(PROG, e)
        return cli.EXIT_USAGE
    print(f"wrote {args.output}: {out['name']}, {len(out['state_dict'])} tensors (strict load checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

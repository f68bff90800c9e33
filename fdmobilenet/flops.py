"""Counts multiply-adds and parameters, and checks FD-MobileNet against the paper.

The paper's "FLOPs" are multiply-adds (MACs): 144 M / 40 M / 12 M for 1x / 0.5x / 0.25x at 224 px.
``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add, so its total is halved. It
counts matrix products and convolutions only (BatchNorm, ReLU and pooling are not multiply-adds of a layer,
and the paper leaves them out too).

Training cost: in torch 2.14 FlopCounterMode's convolution-backward formula ignores ``groups``, so it
overcounts the depthwise layers' backward pass by their channel count. Take training FLOPs as about
3 x the forward count; do not measure them with FlopCounterMode.

Run ``python -m fdmobilenet.flops`` (or ``python benchmarks/flops_check.py``); it exits non-zero when a
count differs from the reference.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import TOTAL_STRIDE, FDMobileNet

# width -> (paper's MACs in millions, exact MACs, exact parameters) at 224 px. The exact numbers are what
# this implementation of the paper's architecture gives (they round to the paper's values); any change to the
# architecture shows up here.
REFERENCE_RESOLUTION = 224
REFERENCE: dict[float, tuple[int, int, int]] = {
    1.0: (144, 144_489_728, 2_901_288),
    0.5: (40, 40_132_224, 993_928),
    0.25: (12, 12_037_952, 383_160),
}
RESOLUTIONS = range(96, 321, TOTAL_STRIDE)


def forward_one_image(model: nn.Module, input_size: int | tuple[int, int]) -> None:
    """One forward pass of one zero image on the model's device (batch 1, eval mode, no autograd); the
    model's mode is restored after it."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, input_size: int | tuple[int, int]) -> int:
    """Multiply-adds of one forward pass of one image (batch 1, eval mode, no autograd)."""
    with FlopCounterMode(display=False) as counter:
        forward_one_image(model, input_size)
    return counter.get_total_flops() // 2


# Bytes a training step moves, as a model: each activation (every layer's output) is written by the forward
# pass and read by the next layer (2 accesses), read again by the backward pass (saved for the gradient) and
# its gradient written and read (3 more). Depthwise convolutions, BatchNorm and ReLU do few operations per
# byte, so for this network these 5 accesses, not the multiply-adds, bound a step on a GPU. It leaves out
# BatchNorm's second pass over its input (more bytes) and the fusion torch.compile does (fewer), and the
# weights and optimizer state (a few MB per step, not per image).
ACTIVATION_ACCESSES = 5


def activation_elements(model: nn.Module, input_size: int) -> int:
    """Elements of every leaf module's output for one image (one forward pass, batch 1)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += output.numel()
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        forward_one_image(model, input_size)
    finally:
        for h in hooks:
            h.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Row:
    width: float
    resolution: int
    params: int
    macs: int
    paper_macs_m: Optional[int] = None      # the paper's value, where it gives one
    expected_macs: Optional[int] = None
    expected_params: Optional[int] = None

    @property
    def ok(self) -> Optional[bool]:
        """True / False against the reference, None where there is none."""
        if self.paper_macs_m is None:
            return None
        return (self.macs == self.expected_macs and self.params == self.expected_params
                and round(self.macs / 1e6) == self.paper_macs_m)


def check(widths: Sequence[float] = tuple(REFERENCE), resolution: int = REFERENCE_RESOLUTION,
          build_model: Callable[[float], nn.Module] = FDMobileNet) -> list[Row]:
    """Count every width; rows for the paper's widths at 224 px carry the reference to compare with."""
    rows = []
    for width in widths:
        # Counting needs shapes only: on the meta device nothing is initialised or computed.
        with torch.device("meta"):
            model = build_model(width)
        row = Row(width, resolution, count_params(model), count_macs(model, resolution))
        if resolution == REFERENCE_RESOLUTION and width in REFERENCE:
            row.paper_macs_m, row.expected_macs, row.expected_params = REFERENCE[width]
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ("width", "input", "params", "MACs", "MACs (M)", "paper (M)", "check")
    lines = [header]
    for r in rows:
        lines.append((f"{r.width:g}x", str(r.resolution), f"{r.params:,}", f"{r.macs:,}", f"{r.macs / 1e6:.1f}",
                      "-" if r.paper_macs_m is None else str(r.paper_macs_m),
                      "-" if r.ok is None else ("OK" if r.ok else "FAIL")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def _width(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"width must be a positive number, got {text}")
    return value


def _resolution(text: str) -> int:
    value = int(text)
    if value not in RESOLUTIONS:
        raise argparse.ArgumentTypeError(f"resolution must be a multiple of {TOTAL_STRIDE} from "
                                         f"{RESOLUTIONS.start} to {RESOLUTIONS.stop - 1}, got {text}")
    return value


def main(argv: Optional[Sequence[str]] = None,
         build_model: Callable[[float], nn.Module] = FDMobileNet) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdmobilenet.flops",
        description="Count FD-MobileNet's parameters and multiply-adds (the paper's 'FLOPs') and check the "
                    "paper's 1x / 0.5x / 0.25x at 224 px: 144 / 40 / 12 M. Exits 1 on any mismatch.")
    parser.add_argument("--width", type=_width, action="extend", nargs="+", metavar="W",
                        help="width multiplier(s) to count, repeatable, any positive value "
                             f"(default: {' '.join(f'{w:g}' for w in REFERENCE)}); the paper's widths are "
                             "checked, others are only counted")
    parser.add_argument("--resolution", type=_resolution, default=REFERENCE_RESOLUTION,
                        help="input size in pixels, a multiple of 32 from 96 to 320 (default 224; the paper's "
                             "values apply at 224 only)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args = parser.parse_args(argv)

    rows = check(args.width or tuple(REFERENCE), args.resolution, build_model)
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in rows], indent=2))
    else:
        print(f"FD-MobileNet multiply-adds (FlopCounterMode / 2), batch 1, torch {torch.__version__}")
        print(format_table(rows))
    failed = [r for r in rows if r.ok is False]
    for r in failed:
        print(f"FAIL: {r.width:g}x at {r.resolution}: {r.macs:,} MACs / {r.params:,} params, expected "
              f"{r.expected_macs:,} / {r.expected_params:,} (paper: {r.paper_macs_m} M)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

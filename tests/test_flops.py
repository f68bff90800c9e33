"""The FLOPs check: exact counts for the paper's widths, a wrong model fails, and the counter agrees with
published numbers for torchvision models nobody here wrote."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fdmobilenet.flops import check, count_macs, count_params, main
from fdmobilenet.model import FDMobileNet

ROOT = Path(__file__).resolve().parents[1]


def test_paper_widths_match_exactly():
    rows = check()
    got = {r.width: (r.macs, r.params) for r in rows}
    assert got == {1.0: (144_489_728, 2_901_288), 0.5: (40_132_224, 993_928), 0.25: (12_037_952, 383_160)}
    assert [round(r.macs / 1e6) for r in rows] == [144, 40, 12]  # the paper's 144 / 40 / 12 M
    assert all(r.ok for r in rows)


class OneBlockWider(FDMobileNet):
    """FD-MobileNet with one extra output channel in block 5's pointwise conv: a near miss that a loose
    (rounded-M only) check would let through at 0.25x."""

    def __init__(self, width_mult):
        super().__init__(width_mult)
        f = self.features
        pw, nxt = f.pw_conv_5, f.dw_conv_6
        c = pw.out_channels + 1
        f.pw_conv_5 = nn.Conv2d(pw.in_channels, c, 1, bias=False)
        f.pw_norm_5 = nn.BatchNorm2d(c)
        f.dw_conv_6 = nn.Conv2d(c, c, 3, stride=nxt.stride, padding=1, groups=c, bias=False)
        f.dw_norm_6 = nn.BatchNorm2d(c)
        f.pw_conv_6 = nn.Conv2d(c, f.pw_conv_6.out_channels, 1, bias=False)


def test_wrong_model_fails_the_check(capsys):
    assert round(count_macs(OneBlockWider(0.25), 224) / 1e6) == 12  # same rounded M as the paper...
    assert main(["--width", "0.25"], build_model=OneBlockWider) == 1  # ...but not the exact count
    out, err = capsys.readouterr()
    assert "FAIL" in out and "0.25x at 224" in err
    assert main(["--width", "0.25"]) == 0


def test_other_widths_and_resolutions_are_counted_without_reference(capsys):
    assert main(["--width", "0.75", "--width", "1.5", "2.0", "--resolution", "160", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["width"] for r in rows] == [0.75, 1.5, 2.0]
    assert all(r["ok"] is None and r["paper_macs_m"] is None and r["resolution"] == 160 for r in rows)
    assert rows[0]["macs"] < rows[1]["macs"] < rows[2]["macs"]
    # Only convolutions/linear layers count, and all but the classifier scale with the pixel count.
    with torch.device("meta"):  # shapes are all the counter needs
        m = FDMobileNet(1.0)
    classifier = 1024 * 1000
    assert count_macs(m, 320) - classifier == pytest.approx((count_macs(m, 160) - classifier) * 4, rel=1e-9)


@pytest.mark.parametrize("argv", [["--resolution", "100"], ["--resolution", "352"], ["--width", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_counter_agrees_with_torchvision_published_numbers():
    # torchvision's model docs: mobilenet_v2 0.30 GFLOPS (300.8 M MACs), 3,504,872 params; resnet50 4.09 GFLOPS.
    with torch.device("meta"):  # shapes are all the counter needs; no init, no compute
        mobilenet = torchvision.models.mobilenet_v2(weights=None)
        resnet = torchvision.models.resnet50(weights=None)
    assert count_params(mobilenet) == 3_504_872
    assert count_macs(mobilenet, 224) == pytest.approx(300.8e6, rel=0.005)
    assert count_macs(resnet, 224) == pytest.approx(4.09e9, rel=0.01)


def test_count_macs_runs_real_weights_and_restores_training_mode():
    m = FDMobileNet(0.25).train()
    assert count_macs(m, 224) == 12_037_952
    assert m.training


def test_cli_end_to_end():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flops_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for width, params, macs, paper in (("1x", "2,901,288", "144,489,728", "144"),
                                       ("0.5x", "993,928", "40,132,224", "40"),
                                       ("0.25x", "383,160", "12,037,952", "12")):
        row = next(line.split() for line in lines if line.split()[:1] == [width])
        assert row == [width, "224", params, macs, row[4], paper, "OK"]

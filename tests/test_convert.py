"""convert_model.py: training checkpoints (DDP / torch.compile prefixes, optimizer state) become single-model
files that load strictly with exactly the trained weights."""
import importlib.util
from pathlib import Path

import pytest
import torch

from fdmobilenet.checkpoint import load_checkpoint, save_checkpoint
from fdmobilenet.model import FDMobileNet

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convert_model", ROOT / "convert_model.py")
convert_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_model)


def training_checkpoint(path, prefix, num_classes=1000):
    torch.manual_seed(1)
    model = FDMobileNet(0.25, num_classes=num_classes)
    with torch.no_grad():  # non-default BN statistics, so a dropped buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # one step from made-up gradients: real momentum buffers in the file
        p.grad = torch.randn_like(p)
    opt.step()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    save_checkpoint({"epoch": 3, "state_dict": state, "optimizer": opt.state_dict(), "best_top1": 1.0}, path)
    return model.state_dict()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_training_checkpoint_round_trips(tmp_path, prefix, capsys):
    trained = training_checkpoint(tmp_path / "train.pth.tar", prefix)
    out = tmp_path / "model.pth.tar"
    assert convert_model.main(["--data", "imagenet-aggressive", "--label", "x", "--model", "0.25",
                               "--input", str(tmp_path / "train.pth.tar"), "--output", str(out)]) == 0
    assert "strict load checked" in capsys.readouterr().out
    converted = load_checkpoint(out)
    assert set(converted) == {"name", "state_dict"} and converted["name"] == "0.25x-FDMobileNet-224"
    model = FDMobileNet(0.25)
    model.load_state_dict(converted["state_dict"], strict=True)  # plain names, nothing missing or extra
    assert list(model.state_dict()) == list(trained)
    for key, value in trained.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_other_class_count_is_kept(tmp_path):
    training_checkpoint(tmp_path / "train.pth.tar", "module.", num_classes=10)
    out = convert_model.convert(str(tmp_path / "train.pth.tar"), str(tmp_path / "m.pth.tar"), "0.25")
    assert out["state_dict"]["classifier.weight"].shape == (10, 256)


def test_wrong_width_is_refused_and_nothing_written(tmp_path, capsys):
    training_checkpoint(tmp_path / "train.pth.tar", "module.")
    out = tmp_path / "model.pth.tar"
    assert convert_model.main(["--model", "0.5x-FDMobileNet-224", "--input", str(tmp_path / "train.pth.tar"),
                               "--output", str(out)]) == 2   # exit 2: a user error (fdmobilenet/cli.py)
    err = capsys.readouterr().err
    assert "features.conv_0.weight has shape (8, 3, 3, 3) in the checkpoint but (16, 3, 3, 3)" in err
    assert not out.exists()


def test_released_file_via_config_name(released_weights, tmp_path):
    out = tmp_path / "released.pth.tar"
    assert convert_model.main(["--model", "0.25x-FDMobileNet-224", "--input", str(released_weights),
                               "--output", str(out)]) == 0
    original = load_checkpoint(released_weights)["state_dict"]
    converted = load_checkpoint(out)
    assert converted["name"] == "0.25x-FDMobileNet-224"
    for key, value in original.items():
        assert torch.equal(converted["state_dict"][key], value), key


def test_help_says_data_and_label_are_ignored(capsys):
    with pytest.raises(SystemExit) as e:
        convert_model.main(["--help"])
    assert e.value.code == 0
    assert " ".join(capsys.readouterr().out.split()).count("compatibility with the authors' tool; ignored") == 2

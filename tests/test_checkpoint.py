"""Checkpoint I/O: atomic saves, refused unsafe pickles, and errors that name the file and say what to do.
(A write that fails on a full disk: the real tmpfs in test_bad_input.py.)"""
import os
import shlex

import pytest
import torch

from fdmobilenet.checkpoint import load_checkpoint, load_weights, model_state_dict, save_checkpoint, strip_prefixes
from fdmobilenet.cli import CheckpointError
from fdmobilenet.model import FDMobileNet


def small_ckpt(seed=0):
    torch.manual_seed(seed)
    return {"name": "0.25x-FDMobileNet-224", "epoch": seed, "state_dict": FDMobileNet(0.25).state_dict()}


def test_save_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "run" / "ckpt.pth.tar"  # the directory is created
    save_checkpoint(small_ckpt(0), path)
    save_checkpoint(small_ckpt(1), path)  # replaces the previous file
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth.tar"]  # no temp file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    back = load_checkpoint(path)
    assert back["epoch"] == 1
    for key, value in small_ckpt(1)["state_dict"].items():
        assert torch.equal(back["state_dict"][key], value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope.pth.tar'} not found; check the path"):
        load_checkpoint(tmp_path / "nope.pth.tar")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, RuntimeError)


def assert_truncation_reported(tmp_path, data: bytes) -> None:
    path = tmp_path / "cut.pth.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"checkpoint {path} is truncated or corrupt (")
    assert "use an earlier checkpoint or re-download it" in str(e.value)


def test_truncated_file_is_reported(tmp_path):   # torch >= 1.6 format
    save_checkpoint(small_ckpt(), tmp_path / "full.pth.tar")
    assert_truncation_reported(tmp_path, (tmp_path / "full.pth.tar").read_bytes())


def test_truncated_legacy_file_is_reported(tmp_path, released_weights):   # the authors' torch 0.3 format
    assert_truncation_reported(tmp_path, released_weights.read_bytes())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n"])
def test_garbage_file_is_reported(tmp_path, content):
    path = tmp_path / "junk.pth.tar"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        load_checkpoint(path)


class RunsACommand:
    """Unpickling this calls os.system: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_arbitrary_pickled_object_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"checkpoint {path} contains objects that are not plain tensors/containers "
                              "(weights_only=True refused: ")
    assert "system" in message  # torch's reason: the blocked global
    assert message.endswith("this file is not a checkpoint written by this project, or it may be malicious; "
                            "it was not loaded")
    assert not marker.exists()


def test_non_dict_file_is_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict"):
        load_checkpoint(tmp_path / "tensor.pt")


def test_strip_prefixes_ddp_and_compile():
    sd = FDMobileNet(0.25).state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        wrapped = type(sd)((prefix + k, v) for k, v in sd.items())
        wrapped._metadata = type(sd._metadata)((prefix + k if k else k, v) for k, v in sd._metadata.items())
        stripped = strip_prefixes(wrapped)
        assert list(stripped) == list(sd)
        assert set(sd._metadata) <= set(stripped._metadata)  # BatchNorm versions kept under the plain names
    assert list(strip_prefixes({"features.module_x.weight": 1})) == ["features.module_x.weight"]


def test_model_state_dict_finds_the_weights():
    sd = {"classifier.bias": torch.zeros(2)}
    assert model_state_dict({"state_dict": sd, "epoch": 3}) is sd
    assert model_state_dict({"model": sd, "optimizer": {}}) is sd
    assert model_state_dict(sd) is sd
    with pytest.raises(CheckpointError, match="run.pth has no model weights.*epoch"):
        model_state_dict({"epoch": 3}, "run.pth")


def test_other_width_mismatch_names_key_and_shapes(released_weights):
    model = FDMobileNet(0.5)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, load_checkpoint(released_weights), str(released_weights))
    n = sum(1 for k in model.state_dict() if not k.endswith("num_batches_tracked") and not k.startswith("classifier.bias"))
    assert str(e.value) == (
        f"checkpoint {released_weights} does not fit the model: features.conv_0.weight has shape (8, 3, 3, 3) in the "
        f"checkpoint but (16, 3, 3, 3) in the model (first of {n} mismatches) — was it trained with another "
        "width_mult?")


def test_missing_and_unexpected_keys_are_listed():
    sd = FDMobileNet(0.25).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["classifier.bias"]
    with pytest.raises(CheckpointError, match=r"ckpt\.pth does not fit the model: missing 1 keys: classifier\.bias; "
                                              r"unexpected 1 keys: extra\.weight"):
        load_weights(FDMobileNet(0.25), {"state_dict": sd}, "ckpt.pth")


def test_load_weights_strips_prefixes():
    src = FDMobileNet(0.25)
    dst = FDMobileNet(0.25)
    load_weights(dst, {"model": {"module." + k: v for k, v in src.state_dict().items()}}, "ddp.pth")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k

"""build_loader, the torchvision baseline and the synthetic loader: one interface, real JPEGs of photos."""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time

import pytest
import torch
from torchvision.datasets import ImageFolder

import loader_support
from launch_support import children
from loader_support import epoch_labels
from fdmobilenet.config import ResolutionRamp
from fdmobilenet.cli import DataError
from pipelines import build_loader
from pipelines.synthetic import SyntheticLoader
from pipelines.torchvision_loader import TorchvisionLoader

CPU = torch.device("cpu")

small = functools.partial(loader_support.small, loader="torchvision")   # a call may name another loader


def check_batch(images: torch.Tensor, labels: torch.Tensor, n: int, size: int, dtype=torch.float32):
    assert images.shape == (n, 3, size, size) and images.dtype == dtype and images.device == CPU
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (n,) and labels.dtype == torch.int64 and labels.device == CPU


# ------------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("train_crop,jitter", [("random_resized", None), ("random", (0.4, 0.4, 0.4, 0.1))])
def test_torchvision_batches_follow_the_interface(photo_root, train_crop, jitter):
    data = small(photo_root, 3, train_crop=train_crop, color_jitter=jitter)
    train = build_loader(data, "train", 4, device=CPU)
    assert isinstance(train, TorchvisionLoader) and len(train) == 2 and train.num_samples == 8
    batches = list(train)
    assert len(batches) == 2
    for images, labels in batches:
        check_batch(images, labels, 4, 32)
        assert -2.2 < images.min() < 0 < images.max() < 2.7
    val = build_loader(data, "val", 4, device=CPU)
    assert [images.shape[0] for images, _ in val] == [4, 3] and val.num_samples == 7
    assert epoch_labels(val, 0) == ImageFolder(str(photo_root / "val")).targets


def test_a_ctrl_c_leaves_the_torchvision_workers_running(photo_root):
    """A terminal's Ctrl-C reaches the DataLoader's worker processes too (the trainer's process group): the
    trainer acts on it at a step the ranks agree on, so the workers ignore it and the batches keep coming."""
    before = set(children(os.getpid()))
    train = build_loader(small(photo_root, 3), "train", 4, device=CPU)   # one persistent worker process
    assert len(list(train)) == 2
    workers = set(children(os.getpid())) - before
    assert len(workers) == 1, workers
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert len(list(train)) == 2 and workers <= set(children(os.getpid()))


def test_torchvision_val_two_ranks_count_every_image_exactly_once(unique_root):
    ranks = [build_loader(small(unique_root, 11), "val", 2, rank=r, world_size=2, device=CPU)
             for r in range(2)]
    seen = [epoch_labels(r, 0) for r in ranks]
    assert [r.num_samples for r in ranks] == [len(s) for s in seen] == [5, 6]
    assert sorted(seen[0] + seen[1]) == list(range(11))


def test_torchvision_train_reshuffles_per_epoch_disjoint_across_ranks(unique_root):
    ranks = [build_loader(small(unique_root, 11), "train", 2, rank=r, world_size=2, device=CPU)
             for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    orders = []
    for epoch in range(2):
        seen = [epoch_labels(r, epoch) for r in ranks]
        assert [len(s) for s in seen] == [4, 4] and not set(seen[0]) & set(seen[1])
        orders.append(seen)
    assert orders[0] != orders[1]


def test_torchvision_epoch_order_is_a_function_of_seed_and_epoch(unique_root):
    """set_epoch's contract for a loader without reader state (pipelines.base): epoch e's order is the same
    whatever came before, e.g. in a restarted process - what a resumed run relies on to replay the epoch and
    drop the batches it trained already (fdmobilenet.loop.epoch_batches)."""
    straight = build_loader(small(unique_root, 11), "train", 1, device=CPU)
    orders = [epoch_labels(straight, e) for e in range(3)]
    restarted = build_loader(small(unique_root, 11), "train", 1, device=CPU)
    assert epoch_labels(restarted, 2) == orders[2] and orders[0] != orders[1] != orders[2]


def test_dali_and_torchvision_val_agree(photo_root):
    """Same files, labels, layout, channel order and normalisation; pixels differ only by the resize
    filters (DALI's antialiased linear vs PIL's bilinear), so they agree closely but not exactly."""
    data = small(photo_root, 3)
    tv = list(build_loader(data, "val", 7, device=CPU))[0]
    dali = list(build_loader(dataclasses.replace(data, loader="dali"), "val", 7, device=CPU))[0]
    assert torch.equal(tv[1], dali[1])
    diff = (tv[0] - dali[0]).abs()
    assert diff.mean() < 0.1, diff.mean()
    for c in range(3):       # per image and channel, the two are the same picture
        a, b = tv[0][:, c].flatten(1), dali[0][:, c].flatten(1)
        assert torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True),
                                                     b - b.mean(1, keepdim=True)).min() > 0.95


def test_torchvision_errors_match_dali(photo_root, tmp_path):
    with pytest.raises(DataError, match=r"nowhere/val not found"):
        build_loader(small(tmp_path / "nowhere", 3), "val", 2, device=CPU)
    with pytest.raises(DataError, match=r"batch size 12 .* 11 training images"):
        build_loader(small(photo_root, 3), "train", 12, device=CPU)


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_loader(photo_root):
    data = small(photo_root, 1000, loader="synthetic", dtype="float16")
    train = build_loader(data, "train", 256, rank=1, world_size=8, device=CPU)
    assert isinstance(train, SyntheticLoader)
    assert len(train) == 1_281_167 // 8 // 256 and train.num_samples == len(train) * 256
    first, again = next(iter(train)), next(iter(train))
    check_batch(*first, 256, 32, torch.float16)
    assert first[0] is again[0]                                   # made once, reused
    assert 0 <= first[1].min() and first[1].max() < 1000
    val = build_loader(data, "val", 256, rank=0, world_size=8, device=CPU)
    assert val.num_samples == 6250 and len(val) == 25
    sizes = [images.shape[0] for images, _ in val]
    assert sum(sizes) == 6250 and sizes[-1] == 6250 - 24 * 256


def test_build_loader_rejects_bad_arguments(photo_root):
    data = small(photo_root, 3)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_loader(data, "test", 2, device=CPU)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        build_loader(data, "train", 2, rank=2, world_size=2, device=CPU)
    with pytest.raises(ValueError, match="keeps no reader state"):
        build_loader(data, "train", 2, device=CPU).load_state_dict({"dali": "x"})


# ------------------------------------------------------------------------------- orientation, bad files
def test_exif_orientation_is_applied_like_dali(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (as phone cameras write it) beside the same photo
    stored upright: DALI's decoder turns it upright, and so must the torchvision loader and predict, or a
    model trained on DALI batches is served rotated pictures. All three agree as closely as on any image."""
    import skimage.data
    from PIL import Image

    from predict import preprocess, read_image
    upright = Image.fromarray(skimage.data.chelsea())              # 451 x 300: rotating it changes the crop
    (tmp_path / "val" / "c00").mkdir(parents=True)
    (tmp_path / "val" / "c01").mkdir()
    upright.save(tmp_path / "val" / "c00" / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6                     # "rotate 90 degrees clockwise to display"
    sideways = tmp_path / "val" / "c01" / "sideways.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=95, exif=exif.tobytes())
    data = small(tmp_path, 2)
    tv = list(build_loader(data, "val", 2, device=CPU))[0][0]
    dali = list(build_loader(dataclasses.replace(data, loader="dali"), "val", 2, device=CPU))[0][0]
    served = preprocess([read_image(str(sideways))], data)[0]
    assert (dali[1] - dali[0]).abs().mean() < 0.02           # DALI: the sideways file shows the upright photo
    assert (tv[1] - tv[0]).abs().mean() < 0.02               # so does the torchvision loader
    assert (tv[1] - dali[1]).abs().mean() < 0.02             # the two loaders agree on it
    torch.testing.assert_close(served, tv[1], rtol=0, atol=1e-5)   # predict's input is the loader's


@pytest.mark.parametrize("workers", [0, 1])
def test_torchvision_names_an_undecodable_file_like_dali(photo_root, tmp_path, workers):
    """A PNG cut in half under a .jpg name passes the up-front check (PIL identifies its header; only JPEGs
    are checked for their end) and fails in decoding: a CorruptImageError that names the file and the fix,
    one line, also from a worker. Random bytes under a .jpg name are refused before the first batch."""
    import shutil

    from PIL import Image

    from fdmobilenet.cli import CorruptImageError
    root = tmp_path / "data"
    shutil.copytree(photo_root, root)
    victim = root / "val" / "c01" / "half_png.jpg"
    Image.open(sorted((root / "val" / "c01").iterdir())[0]).save(victim, format="PNG")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    loader = build_loader(small(root, 3, num_threads=workers), "val", 4, device=CPU)
    with pytest.raises(CorruptImageError) as e:
        list(loader)
    message = str(e.value)
    assert message.startswith(f"cannot decode {victim} (truncated or corrupt image: ") and "\n" not in message
    assert "replace or delete it, or set data.on_corrupt=skip" in message and "pipelines.verify" in message
    noise = root / "val" / "c01" / "garbage.jpg"
    noise.write_bytes(b"\x00not an image at all" * 50)
    with pytest.raises(CorruptImageError, match=f"1 file\\(s\\) that are not an image in {root / 'val'}: {noise}; "
                                                f"replace or delete them"):
        build_loader(small(root, 3, num_threads=workers), "val", 4, device=CPU)


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_zero_byte_file_is_called_empty(photo_root, tmp_path, loader):
    import shutil

    from fdmobilenet.cli import CorruptImageError
    root = tmp_path / "data"
    shutil.copytree(photo_root, root)
    victim = root / "train" / "c00" / "empty.jpg"
    victim.write_bytes(b"")
    with pytest.raises(CorruptImageError) as e:
        build_loader(small(root, 3, loader=loader), "train", 2, device=CPU)
    assert f"1 empty file(s) (0 bytes) in {root / 'train'}: {victim}" in str(e.value)
    assert "truncated" not in str(e.value)


# ------------------------------------------------------------------------------------- training resolution
@pytest.mark.parametrize("loader, threads", [("dali", 1), ("torchvision", 0), ("torchvision", 1), ("synthetic", 0)])
def test_train_batches_follow_the_resolution_ramp_and_val_keeps_its_size(photo_root, loader, threads):
    """data.train_res from 32 px to crop_size 96 over epochs 1-3: every batch of an epoch at that epoch's size
    (the torchvision loader's persistent worker process too, threads=1), val at val_crop throughout."""
    data = small(photo_root, 3, loader=loader, num_threads=threads, crop_size=96, val_resize=72, val_crop=64,
                 train_res=ResolutionRamp(start_res=32, ramp_start=1, ramp_end=3))
    train, val = (build_loader(data, split, 4, device=CPU) for split in ("train", "val"))
    for epoch, size in enumerate([32, 64, 96, 96]):
        train.set_epoch(epoch)
        val.set_epoch(epoch)
        assert (train.image_size, val.image_size) == (size, 64)
        assert {tuple(images.shape) for images, _ in train} == {(4, 3, size, size)}
        assert {tuple(images.shape[1:]) for (images, _), _ in zip(val, range(3))} == {(3, 64, 64)}


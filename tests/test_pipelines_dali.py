"""The DALI loader on the CPU (the same graph as on the GPU; only op placement differs), over real JPEGs."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import loader_support
from fdmobilenet.cli import CorruptImageError, DataError
from fdmobilenet.config import ResolutionRamp
from loader_support import epoch_labels
from pipelines import build_loader
from pipelines.base import split_dir
from pipelines.integrity import SOF_MARKERS, file_damage
from pipelines.splits import check_split, list_folder
from pipelines.dali import DaliLoader

CPU = torch.device("cpu")

small = functools.partial(loader_support.small, loader="dali")   # a call may name another loader


# ------------------------------------------------------------------------------------------ listing / labels
def test_listing_and_labels_equal_torchvision_imagefolder(photo_root):
    data = small(photo_root, 3)
    for split in ("train", "val"):
        classes, samples = list_folder(data, split_dir(data, split))
        reference = ImageFolder(str(photo_root / split))
        assert classes == reference.classes
        assert samples == reference.samples
        # the data pre-flight hands the DALI reader exactly that listing
        assert check_split(data, split).reader == {"files": [p for p, _ in samples], "labels": reference.targets}
    # the val pipeline reads in listing order: its labels are ImageFolder's targets, in order
    val = build_loader(data, "val", 4, device=CPU)
    assert epoch_labels(val, 0) == ImageFolder(str(photo_root / "val")).targets


@pytest.mark.parametrize("train_crop,jitter,dtype", [("random_resized", None, "auto"),
                                                     ("random", (0.4, 0.4, 0.4, 0.1), "float16")])
def test_batches_follow_the_interface(photo_root, train_crop, jitter, dtype):
    data = small(photo_root, 3, train_crop=train_crop, color_jitter=jitter, dtype=dtype)
    want = torch.float32 if dtype == "auto" else torch.float16     # auto = float32 on CPU
    train = build_loader(data, "train", 4, device=CPU)
    assert isinstance(train, DaliLoader) and len(train) == 11 // 4 and train.num_samples == 8
    batches = list(train)
    assert len(batches) == len(train)
    for images, labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == want
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (4,) and labels.device == CPU
        # normalised photo pixels: roughly zero-centred, inside (0 - mean) / std .. (1 - mean) / std
        assert -2.2 < images.float().min() < 0 < images.float().max() < 2.7
    val = build_loader(data, "val", 4, device=CPU)
    sizes = [images.shape[0] for images, _ in val]
    assert sizes == [4, 3] and len(val) == 2 and val.num_samples == 7


def test_nchw_view_is_channels_last_and_shares_dalis_storage(photo_root):
    loader = build_loader(small(photo_root, 3), "train", 4, device=CPU)
    dali_out = next(loader._build())[0]                 # what DALIGenericIterator returned (NHWC)
    images, labels = loader.to_batch(dali_out)
    assert dali_out["images"].shape == (4, 32, 32, 3) and images.shape == (4, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert images.data_ptr() == dali_out["images"].data_ptr()          # a view: no copy
    assert images.untyped_storage().data_ptr() == dali_out["images"].untyped_storage().data_ptr()
    assert torch.equal(images[:, 1], dali_out["images"][..., 1])        # channel 1 is channel 1
    assert labels.data_ptr() == dali_out["labels"].data_ptr()


def test_flip_and_crop_are_random_but_val_is_deterministic(photo_root):
    data = small(photo_root, 3)
    a = [images for images, _ in build_loader(data, "val", 7, device=CPU)][0]
    b = [images for images, _ in build_loader(data, "val", 7, device=CPU)][0]
    assert torch.equal(a, b)
    train = build_loader(dataclasses.replace(data, train_crop="random"), "train", 11, device=CPU)
    first = {l: x for x, y in train for l, x in zip(y.tolist(), x)}
    second = {l: x for x, y in train for l, x in zip(y.tolist(), x)}
    assert any(not torch.equal(first[k], second[k]) for k in first.keys() & second.keys())


# -------------------------------------------------------------------------------------------------- sharding
def test_val_two_ranks_count_every_image_exactly_once(unique_root):
    data = small(unique_root, 11)                                    # 11 images, label = image
    ranks = [build_loader(data, "val", 2, rank=r, world_size=2, device=CPU) for r in range(2)]
    assert [r.num_samples for r in ranks] == [5, 6] and [len(r) for r in ranks] == [3, 3]
    for epoch in range(2):
        seen = [epoch_labels(r, epoch) for r in ranks]
        assert [len(s) for s in seen] == [5, 6]
        assert sorted(seen[0] + seen[1]) == list(range(11))          # the dataset, no duplicates


def test_train_epochs_cover_everything_in_a_new_order(unique_root):
    loader = build_loader(small(unique_root, 11), "train", 1, device=CPU)
    orders = [epoch_labels(loader, e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(11))
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] != sorted(orders[0])                            # epoch 0 is shuffled too


def test_set_epoch_picks_the_first_shuffle_then_dali_reshuffles_by_itself(unique_root):
    """set_epoch's contract for a loader with reader state (pipelines.base): before the first batch the epoch
    picks the shuffle (data.seed + epoch), the same in any process; after that DALI reshuffles at the end of
    each of its epochs by itself and set_epoch changes nothing - the reader state carries the order."""
    data = small(unique_root, 11)

    def orders(epochs: list[int]) -> list[list[int]]:
        loader = build_loader(data, "train", 1, device=CPU)
        return [epoch_labels(loader, e) for e in epochs]

    straight, told_otherwise = orders([0, 1]), orders([0, 7])
    assert straight == told_otherwise and straight[0] != straight[1]
    started_at_3 = orders([3])
    assert started_at_3 == orders([3]) and started_at_3[0] != straight[0]


def test_train_ranks_are_disjoint_with_equal_step_counts(unique_root):
    data = small(unique_root, 11)
    ranks = [build_loader(data, "train", 2, rank=r, world_size=2, device=CPU) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]                         # 11 // 2 = 5 per rank -> 2 batches
    per_epoch = []
    for epoch in range(3):
        seen = [epoch_labels(r, epoch) for r in ranks]
        assert [len(s) for s in seen] == [4, 4]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 8
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]


def test_epochs_left_early(unique_root):
    data = small(unique_root, 11)
    train = build_loader(data, "train", 2, device=CPU)                 # 5 steps, 1 image dropped
    for epoch in range(2):              # zip stops after len() batches: the dropped tail stays unread
        train.set_epoch(epoch)
        assert len([b for _, b in zip(range(len(train)), train)]) == 5
    capped = []
    for epoch in range(3):              # a steps_per_epoch cap of 2: the stream continues, nothing wasted
        train.set_epoch(2 + epoch)
        capped.append([b[1].tolist() for _, b in zip(range(2), train)])
    assert [len(c) for c in capped] == [2, 2, 1]                       # epoch 2 has 5 steps: 2 + 2 + 1
    assert len({l for c in capped for b in c for l in b}) == 10
    val = build_loader(data, "val", 2, device=CPU)
    next(iter(val))                     # a val pass left after one batch: the next pass is whole
    assert epoch_labels(val, 0) == list(range(11))


def test_batch_larger_than_a_ranks_share_is_a_clear_error(unique_root):
    with pytest.raises(DataError, match=r"batch size 6 .* 11 training images .* 5"):
        build_loader(small(unique_root, 11), "train", 6, rank=0, world_size=2, device=CPU)


# ---------------------------------------------------------------------------------------------------- state
def test_checkpoint_resumes_the_exact_batches(unique_root, tmp_path):
    data = small(unique_root, 11)

    def take(loader, n=None):
        out = []
        for images, labels in loader:
            out.append((labels.tolist(), images.clone()))
            if n is not None and len(out) == n:
                break
        return out

    loader = build_loader(data, "train", 2, device=CPU)
    take(loader)                                                     # epoch 0
    loader.set_epoch(1)
    take(loader, 2)                                                  # mid epoch 1
    path = tmp_path / "loader.pt"
    torch.save(loader.state_dict(), path)
    rest = take(loader)                                              # the rest of epoch 1
    loader.set_epoch(2)
    nxt = take(loader)                                               # epoch 2

    resumed = build_loader(data, "train", 2, device=CPU)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.set_epoch(1)
    rest2 = take(resumed)
    resumed.set_epoch(2)
    nxt2 = take(resumed)
    assert len(rest) == len(loader) - 2 == len(rest2)
    for (la, xa), (lb, xb) in zip(rest + nxt, rest2 + nxt2):
        assert la == lb and torch.equal(xa, xb)                      # same files, same random crops/flips
    assert build_loader(data, "val", 2, device=CPU).state_dict() == {}


def test_a_change_of_resolution_keeps_the_reader_going_and_resumes_exactly(unique_root, tmp_path):
    """At a change of training resolution the pipeline is rebuilt from a DALI checkpoint at the batches handed
    out, not at those prefetched: after the change the batches are exactly those of a run at that size from the
    start (same files, same random crops and flips), and a loader restored from a state saved just before
    the change, or two batches after it, yields the rest of them."""
    ramp = small(unique_root, 11, crop_size=64, prefetch_queue_depth=2,
                 train_res=ResolutionRamp(start_res=32, ramp_start=1, ramp_end=2))
    fixed = dataclasses.replace(ramp, train_res=None)

    def batches(loader, epochs, stop_after=None):
        out = []
        for epoch in epochs:
            loader.set_epoch(epoch)
            for images, labels in loader:
                out.append((epoch, labels.tolist(), images.clone()))
                if len(out) == stop_after:
                    return out
        return out

    straight = batches(build_loader(ramp, "train", 2, device=CPU), range(3))
    at_64 = batches(build_loader(fixed, "train", 2, device=CPU), range(3))
    assert [b[2].shape[-1] for b in straight] == [32] * 5 + [64] * 10
    assert [b[1] for b in straight] == [b[1] for b in at_64]                 # the reader's order is untouched
    for (_, _, a), (_, _, b) in zip(straight[5:], at_64[5:]):
        assert torch.equal(a, b)

    for done in (5, 7):           # saved at the end of epoch 0 (32 px), and 2 batches into epoch 1 (64 px)
        loader = build_loader(ramp, "train", 2, device=CPU)
        batches(loader, range(2), stop_after=done)
        torch.save(loader.state_dict(), tmp_path / "loader.pt")
        resumed = build_loader(ramp, "train", 2, device=CPU)
        resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
        rest = batches(resumed, [1, 2])
        assert len(rest) == 15 - done
        for (ea, la, a), (eb, lb, b) in zip(straight[done:], rest):
            assert (ea, la) == (eb, lb) and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- bad data
@pytest.fixture()
def truncated_root(photo_root, tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "bad"
    shutil.copytree(photo_root / "train", root / "train")
    victim = sorted((root / "train" / "c01").iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])                      # cut mid scan: "premature end"
    return root, victim


TRAIN_3_EPOCHS = """
import torch
from fdmobilenet.config import DataConfig
from pipelines import build_loader
data = DataConfig(root={root!r}, num_classes=3, crop_size=32, num_threads=1)
loader = build_loader(data, "train", 2, device=torch.device("cpu"))
for epoch in range(3):
    loader.set_epoch(epoch)
    for images, labels in loader:
        pass
print("TRAINED WITHOUT ERROR")
"""


def run_training(root: Path) -> list[str]:
    """Train 3 epochs in a child process (a hang would fail the timeout); the DamagedFiles lines."""
    done = subprocess.run([sys.executable, "-c", TRAIN_3_EPOCHS.format(root=str(root))], capture_output=True,
                          text=True, timeout=90)
    assert done.returncode != 0 and "TRAINED WITHOUT ERROR" not in done.stdout
    return [line for line in done.stderr.splitlines()
            if line.startswith("pipelines.splits.DamagedFiles")]


def test_truncated_jpeg_stops_training_with_an_error_naming_it(truncated_root):
    """Found up front (the GPU decoders would decode it silently, grey where data is missing)."""
    root, victim = truncated_root
    error = run_training(root)
    assert error and error[0].startswith("pipelines.splits.DamagedFiles: 1 truncated JPEG(s) in ")
    assert str(victim) in error[0]


def frame_header_of_width_zero(jpeg: bytes) -> bytes:
    """The JPEG with its frame header (SOF) saying 0 pixels wide: markers, lengths and the end intact."""
    data, i = bytearray(jpeg), 2
    while data[i + 1] not in SOF_MARKERS:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 7:i + 9] = bytes(2)                                      # SOF: length, precision, height, width
    return bytes(data)


def test_undecodable_jpeg_stops_training_with_dalis_error_naming_it(photo_root, tmp_path):
    """Damage the up-front check does not look for (the frame header says 0 pixels wide; the markers chain
    up and the file ends with its end-of-image marker): DALI's decoder fails on it and the loader names the
    file from DALI's message."""
    root = tmp_path / "garbled"
    shutil.copytree(photo_root / "train", root / "train")
    victim = sorted((root / "train" / "c02").iterdir())[0]
    victim.write_bytes(frame_header_of_width_zero(victim.read_bytes()))
    assert file_damage(str(victim)) is None
    error = run_training(root)
    assert error and error[0].startswith("pipelines.splits.DamagedFiles: cannot decode ")
    assert str(victim) in error[0]


def test_garbled_headers_are_refused_before_the_first_batch(photo_root, tmp_path):
    """Headers DALI's parser rejects without naming the file (tables and frame zeroed) and content that is no
    image: the pre-flight finds both, so the error names them before any batch is read."""
    root = tmp_path / "garbled"
    shutil.copytree(photo_root / "train", root / "train")
    zeroed, noise = sorted((root / "train" / "c02").iterdir())[:2]
    data = bytearray(zeroed.read_bytes())
    data[2:400] = bytes(398)                                          # headers (tables, frame) zeroed
    zeroed.write_bytes(bytes(data))
    noise.write_bytes(b"\x00not an image at all" * 50)
    with pytest.raises(CorruptImageError) as e:
        build_loader(small(root, 3), "train", 2, device=CPU)
    assert (f"1 JPEG(s) whose headers cannot be parsed in {root / 'train'}: {zeroed}; 1 file(s) that are not an "
            f"image in {root / 'train'}: {noise}; replace or delete them, or set data.on_corrupt=skip") in str(e.value)


def test_truncated_jpeg_in_a_shard_names_tar_and_key(truncated_root, tmp_path):
    from pipelines.pack import pack

    root, victim = truncated_root
    pack(root / "train", tmp_path / "wds" / "train", shard_size=4, workers=1)
    key = f"{sorted(p for p in (root / 'train').rglob('*.jpg')).index(victim):08d}"
    with pytest.raises(CorruptImageError, match=rf"1 truncated JPEG.*train-00000\d\.tar:\d+:{key}\.jpg"):
        build_loader(small(tmp_path / "wds", 3, layout="webdataset"), "train", 2, device=CPU)


def test_garbled_headers_in_a_shard_are_found_and_named(photo_root, tmp_path):
    from pipelines.pack import pack

    src = tmp_path / "garbled" / "train"
    shutil.copytree(photo_root / "train", src)
    victim = sorted(src.rglob("*.jpg"))[4]
    data = bytearray(victim.read_bytes())
    data[2:400] = bytes(398)
    victim.write_bytes(bytes(data))
    pack(src, tmp_path / "wds" / "train", shard_size=4, workers=1)
    with pytest.raises(CorruptImageError, match=r"1 JPEG\(s\) whose headers cannot be parsed .*"
                                                r"train-000001\.tar:\d+:00000004\.jpg"):
        build_loader(small(tmp_path / "wds", 3, layout="webdataset"), "train", 11, device=CPU)


def test_start_up_check_reads_headers_and_end_marker_and_confirms(photo_root, tmp_path):
    good = sorted((photo_root / "val").rglob("*.jpg"))[0]
    data = good.read_bytes()
    padded, cut, png = tmp_path / "padded.jpg", tmp_path / "cut.jpg", tmp_path / "png.jpg"
    padded.write_bytes(data + bytes(100) + b"trailing bytes some writers leave")   # still a good image
    cut.write_bytes(data[:-300])
    Image.open(good).save(png, format="PNG")
    assert file_damage(str(good)) is None and file_damage(str(padded)) is None
    assert file_damage(str(cut)) == "truncated" and file_damage(str(png)) is None   # PNGs: identified by PIL
    zeroed, noise, empty, stub = (tmp_path / f"{n}.jpg" for n in ("zeroed", "noise", "empty", "stub"))
    zeroed.write_bytes(data[:2] + bytes(398) + data[400:])
    noise.write_bytes(bytes(range(256)) * 8)
    empty.write_bytes(b"")
    stub.write_bytes(data[:200])                                      # cut inside its headers
    assert [file_damage(str(p)) for p in (zeroed, noise, empty, stub)] == ["headers", "not an image", "empty",
                                                                            "truncated"]
    # the same check on a member inside a container file: offset and size
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 100 + data + data[:-300])
    assert file_damage(str(blob), 100, len(data)) is None
    assert file_damage(str(blob), 100 + len(data), len(data) - 300) == "truncated"


def test_on_corrupt_skip_drops_the_file_up_front(truncated_root, capsys):
    root, victim = truncated_root
    loader = build_loader(small(root, 3, on_corrupt="skip", val_split="train"), "val", 4, device=CPU)
    err = capsys.readouterr().err
    assert (f"\npipelines.splits: data.on_corrupt=skip: dropped 1 unreadable file(s) from {root / 'train'}: "
            f"{victim}\n") in err and "Warning" not in err                     # one line, no Python warning
    assert loader.num_samples == 10
    assert sum(len(labels) for _, labels in loader) == 10


def test_missing_and_empty_folders_are_clear_errors(photo_root, tmp_path):
    with pytest.raises(DataError, match=r"nowhere/train not found .*<class>/<image>\.jpg"):
        build_loader(small(tmp_path / "nowhere", 3), "train", 2, device=CPU)
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"flat/train has no class sub-folders"):
        build_loader(small(tmp_path / "flat", 3), "train", 2, device=CPU)
    shutil.copytree(photo_root / "train", tmp_path / "holes" / "train")
    (tmp_path / "holes" / "train" / "c03_empty").mkdir()
    with pytest.raises(DataError, match=r"empty class folder.*c03_empty"):
        build_loader(small(tmp_path / "holes", 4), "train", 2, device=CPU)
    with pytest.raises(DataError, match=r"3 class folders but data.num_classes is 1000"):
        build_loader(small(photo_root, 1000), "train", 2, device=CPU)


# ----------------------------------------------------------------------------------------------- webdataset
@pytest.fixture(scope="module")
def wds_root(unique_root, photo_root, tmp_path_factory) -> Path:
    """Both trees packed by pipelines.pack (4 samples per shard, so several shards per split)."""
    from pipelines.pack import pack

    root = tmp_path_factory.mktemp("wds")
    for name, src in (("unique", unique_root), ("photos", photo_root)):
        for split in ("train", "val"):
            pack(src / split, root / name / split, shard_size=4, workers=1)
    return root


def test_webdataset_gives_the_same_images_and_labels_as_the_folder(photo_root, unique_root, wds_root):
    for name, src, classes in (("photos", photo_root, 3), ("unique", unique_root, 11)):
        folder = build_loader(small(src, classes), "val", 4, device=CPU)
        shards = build_loader(small(wds_root / name, classes, layout="webdataset"), "val", 4, device=CPU)
        assert len(folder) == len(shards) and folder.num_samples == shards.num_samples
        for (xa, la), (xb, lb) in zip(folder, shards):
            assert torch.equal(la, lb) and torch.equal(xa, xb)       # labels 0..10: two-digit .cls too


def test_webdataset_sharding_and_shuffling(wds_root):
    data = small(wds_root / "unique", 11, layout="webdataset")
    val = [build_loader(data, "val", 2, rank=r, world_size=2, device=CPU) for r in range(2)]
    seen = [epoch_labels(v, 0) for v in val]
    assert sorted(seen[0] + seen[1]) == list(range(11))
    train = [build_loader(data, "train", 1, rank=r, world_size=2, device=CPU) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = [epoch_labels(t, epoch) for t in train]
        assert [len(s) for s in seen] == [5, 5] and not set(seen[0]) & set(seen[1])
        orders.append(seen)
    assert orders[0] != orders[1]


def test_webdataset_without_shards_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"no webdataset shards in .*train .*pipelines.pack"):
        build_loader(small(tmp_path, 3, layout="webdataset"), "train", 2, device=CPU)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_placement_matches_the_cpu_graph(photo_root):
    """DALI's mixed (nvJPEG) decode and GPU ops: the same graph as on the CPU above, placed on the GPU. The
    batches are handed over on torch's current stream (pipelines.dali.hand_over_on_current_stream): taken on
    the default stream and on a side stream, they hold the images the CPU graph decodes."""
    gpu = torch.device("cuda", 0)
    data = small(photo_root, 3, train_crop="random", color_jitter=(0.4, 0.4, 0.4, 0.1))
    for images, labels in build_loader(data, "train", 4, device=gpu):
        assert images.device == labels.device == gpu and images.dtype == torch.float16
        assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    on_gpu = list(build_loader(data, "val", 7, device=gpu))[0]
    on_cpu = list(build_loader(data, "val", 7, device=CPU))[0]
    assert torch.equal(on_gpu[1].cpu(), on_cpu[1])
    assert (on_gpu[0].float().cpu() - on_cpu[0]).abs().mean() < 0.05     # nvJPEG vs libjpeg-turbo
    side = torch.cuda.Stream(gpu)
    with torch.cuda.stream(side):
        on_side = list(build_loader(data, "val", 7, device=gpu))[0]
        on_side = (on_side[0].float().cpu(), on_side[1].cpu())            # read on the stream they came on
    assert torch.equal(on_side[1], on_cpu[1]) and (on_side[0] - on_cpu[0]).abs().mean() < 0.05


@pytest.mark.gpu
def test_the_gpu_pipeline_follows_the_resolution_ramp_without_losing_its_place(unique_root):
    """The mixed-decode train pipeline across a change of size (32 -> 64 px at epoch 2): batches at each
    epoch's size on the GPU, and the same files in the same order as the CPU graph read them."""
    gpu = torch.device("cuda", 0)
    data = small(unique_root, 11, crop_size=64, prefetch_queue_depth=2,
                 train_res=ResolutionRamp(start_res=32, ramp_start=1, ramp_end=2))
    orders = {}
    for device in (gpu, CPU):
        loader = build_loader(data, "train", 2, device=device)
        orders[device.type] = []
        for epoch, size in enumerate([32, 64, 64]):
            loader.set_epoch(epoch)
            for images, labels in loader:
                assert images.shape[-2:] == (size, size) and images.device == device
                orders[device.type] += labels.tolist()
    assert orders["cuda"] == orders["cpu"] and len(orders["cpu"]) == 30


@pytest.fixture
def one_photo(tmp_path) -> Path:
    """skimage's chelsea (451x300), saved as 8 copies of one JPEG (q90, 4:4:4) in a one-class folder."""
    import skimage.data
    folder = tmp_path / "photo" / "train" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(skimage.data.chelsea()).save(folder / "a.jpg", quality=90, subsampling=0)
    for i in range(1, 8):
        shutil.copyfile(folder / "a.jpg", folder / f"{'abcdefgh'[i]}.jpg")
    return folder


def decoded(folder: Path, device: str, hw_decoder_load: float) -> np.ndarray:
    """The 8 JPEGs through DALI's decoder alone (readers.file -> decoders.image), as the pipeline's decode
    step runs it ('mixed' = nvJPEG on the GPU, its hardware decoder taking ``hw_decoder_load`` of them)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=8, num_threads=1, device_id=0 if device == "mixed" else None)
    def decode():
        jpegs, _ = fn.readers.file(files=sorted(str(p) for p in folder.iterdir()))
        extra = dict(hw_decoder_load=hw_decoder_load) if device == "mixed" else {}
        return fn.decoders.image(jpegs, device=device, output_type=types.RGB, **extra)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    out = out.as_cpu() if device == "mixed" else out
    return np.stack([np.array(out[i]) for i in range(8)]).astype(np.int16)


@pytest.mark.gpu
@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.99])
def test_mixed_decode_of_a_photo_matches_the_cpu_decode(one_photo, hw_decoder_load):
    """nvJPEG (CUDA path at 0, mostly the hardware decoder at 0.99) against libjpeg-turbo on the CPU. Both
    are conforming decoders of a 4:4:4 JPEG (no chroma upsampling to differ in): they may differ by IDCT and
    colour-conversion rounding, a few levels of 255 at most. Tolerance: mean |diff| <= 1 level and 99.9 % of
    the samples within 8 levels - a wrong decode (grey blocks, shifted or swapped channels) is far outside."""
    gpu, cpu = decoded(one_photo, "mixed", hw_decoder_load), decoded(one_photo, "cpu", 0.0)
    assert gpu.shape == cpu.shape == (8, 300, 451, 3)
    diff = np.abs(gpu - cpu)
    assert diff.mean() <= 1.0 and np.quantile(diff, 0.999) <= 8, (diff.mean(), np.quantile(diff, 0.999))


@pytest.mark.gpu
def test_truncated_jpeg_is_refused_on_the_gpu_path(truncated_root):
    """nvJPEG decodes a half-cut JPEG without an error: the loader's up-front check names it before DALI's
    mixed decoder gets to see it."""
    gpu = torch.device("cuda", 0)
    root, victim = truncated_root
    with pytest.raises(CorruptImageError, match=victim.name):
        build_loader(small(root, 3), "train", 2, device=gpu)


def jpeg_engines_busy(loader, seconds: float):
    """NVML's samples of the JPEG engines (pipelines.hw_decoder.JpegEngineUse) while ``loader`` hands over
    batches for ``seconds``, epoch after epoch, after one batch that builds the pipeline."""
    from pipelines.hw_decoder import JpegEngineSampler

    def endless():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader
    batches = endless()
    next(batches)
    with JpegEngineSampler(0) as use:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            next(batches)
        torch.cuda.synchronize()
    return use


@pytest.mark.gpu
def test_hw_decoder_load_099_decodes_on_the_hardware_jpeg_decoder(tmp_path):
    """On a GPU whose die carries the hardware JPEG decoder (pipelines.defaults.has_hw_jpeg_decoder, what
    hw_decoder_load 'auto' goes by), DALI's mixed decode at hw_decoder_load 0.99 must use it: nvJPEG must
    create its hardware backend and report engines (pipelines.hw_decoder.probe: what nvImageCodec needs to
    give the decoder any share), and NVML must see the JPEG engines busy while the project's loader decodes
    photo JPEGs - and idle at hw_decoder_load 0, so that the samples tell the two apart. Fails where the
    decoder is there but unusable (e.g. a container without the driver's video capability): the mixed-decode
    test above passes on the CUDA decoder alone."""
    from pipelines.defaults import has_hw_jpeg_decoder
    from pipelines.hw_decoder import probe
    from pipelines.photo_set import build_photo_set
    gpu = torch.device("cuda", 0)
    name, capability = torch.cuda.get_device_name(gpu), torch.cuda.get_device_capability(gpu)
    if not has_hw_jpeg_decoder(name, capability):
        pytest.skip(f"{name} (sm_{capability[0]}{capability[1]}) carries no hardware JPEG decoder")
    found = probe()
    assert found.usable, found.status
    root = tmp_path / "photos"
    build_photo_set(root, num_train=512, num_val=0, num_classes=4)   # 500x375 q90 4:2:0: what the engine takes
    busiest = {}
    for load in (0.0, 0.99):
        data = small(root, 4, hw_decoder_load=load, num_threads=4, prefetch_queue_depth=2, crop_size=224)
        use = jpeg_engines_busy(build_loader(data, "train", 128, device=gpu), seconds=3.0)
        assert use.samples, f"NVML could not sample the JPEG engines ({use.status}): their use is unproven"
        busiest[load] = max(use.samples)
    assert busiest[0.99] > 0 and busiest[0.0] < busiest[0.99], busiest

"""predict.py: the authors' released 0.25x weights on real photos (scikit-image's Chelsea), and a
model of this project's own (the digits) scored with its run's preprocessing and class names."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from fdmobilenet.checkpoint import load_checkpoint, save_checkpoint
from launch_support import REPO, build_digits, env, run_words
from predict import imagenet_classes, main

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(d / "chelsea.jpg", quality=90)
    Image.fromarray(data.coffee()).save(d / "coffee.jpg", quality=90)
    return d


def test_json_output_released_weights_see_a_cat(released_weights, photos):
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), "--checkpoint", str(released_weights),
                           "--model", "0.25x-FDMobileNet-224", "--json",
                           str(photos / "chelsea.jpg"), str(photos / "coffee.jpg")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["image"] for r in results] == [str(photos / "chelsea.jpg"), str(photos / "coffee.jpg")]
    classes = imagenet_classes()
    for r in results:
        assert set(r) == {"image", "top5"} and len(r["top5"]) == 5
        for entry in r["top5"]:
            assert set(entry) == {"index", "name", "prob"}
            assert entry["name"] == classes[entry["index"]]
        probs = [e["prob"] for e in r["top5"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert results[0]["top5"][0]["index"] in CATS
    assert results[1]["top5"][0]["name"] in {"espresso", "cup", "coffee mug"}


def test_text_output_and_sample_cat(released_weights, capsys):
    assert main(["--checkpoint", str(released_weights), "--model", "0.25", "--sample-cat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "skimage.data.chelsea()" and len(lines) == 6
    index, prob, name = lines[1].split(maxsplit=2)
    assert int(index) in CATS and 0.2 < float(prob) <= 1 and name == imagenet_classes()[int(index)]


def test_unreadable_image_is_named(released_weights, tmp_path, photos, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    assert main(["--checkpoint", str(released_weights), "--model", "0.25", str(photos / "chelsea.jpg"), str(bad)]) == 2
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(["--checkpoint", str(released_weights), "--model", "0.25", str(tmp_path / "missing.jpg")]) == 2
    assert f"cannot read image {tmp_path / 'missing.jpg'}" in capsys.readouterr().err


def test_wrong_width_names_the_checkpoint(released_weights, photos, capsys):
    assert main(["--checkpoint", str(released_weights), "--model", "1x-FDMobileNet-224", str(photos / "chelsea.jpg")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {released_weights} does not fit the model" in err and "width_mult" in err


def test_width_and_classes_come_from_the_checkpoint(released_weights, photos, tmp_path, capsys):
    """Without --model: the authors' file (no stored config) by its tensor shapes, 0.25x and 1000 classes;
    a 10-class 0.5x file of this project's format names its classes by output index."""
    assert main(["--checkpoint", str(released_weights), "--json", str(photos / "chelsea.jpg")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top5"][0]["index"] in CATS
    import torch

    from fdmobilenet.checkpoint import save_checkpoint
    from fdmobilenet.model import FDMobileNet
    torch.manual_seed(0)
    save_checkpoint({"state_dict": FDMobileNet(0.5, num_classes=10).state_dict()}, tmp_path / "ten.pth.tar")
    assert main(["--checkpoint", str(tmp_path / "ten.pth.tar"), "--json", str(photos / "coffee.jpg")]) == 0
    top5 = json.loads(capsys.readouterr().out)[0]["top5"]
    assert len(top5) == 5 and all(e["name"] == f"class {e['index']}" and e["index"] < 10 for e in top5)


# ------------------------------------------------------------------------------ a model of this project's own
@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """One short plain-process run on the demo's real digits at 32 px (DALI, as the demo; 3 epochs of 40 steps,
    ~66 % val top-1): a 10-class model whose evaluation preprocessing (resize 36, crop 32, the digits' mean /
    std) is not ImageNet's."""
    digits = build_digits(tmp_path_factory.mktemp("digits"))
    out = tmp_path_factory.mktemp("run")
    words = run_words(digits, out, "digits", "optim.epochs=3", "optim.warmup_epochs=0.5", steps=40, batch=32)
    p = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *words],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return digits, out / "digits_best.pth.tar"


def predicted_top1(checkpoint, images: list[str], capsys) -> list[tuple[int, str, float]]:
    assert main(["--checkpoint", str(checkpoint), "--json", *images]) == 0
    return [(r["top5"][0]["index"], r["top5"][0]["name"], r["top5"][0]["prob"])
            for r in json.loads(capsys.readouterr().out)]


@pytest.mark.slow
def test_predict_agrees_with_evaluate_on_every_digit(digits_model, tmp_path, capsys):
    """evaluate.py --predictions on 2 torchrun ranks (the torchvision loader: the PIL decode and resize that
    predict uses too) against predict on each of the 359 val images: the same top-1 on every image, so the
    same top-1 accuracy, and the run's class folder names. At fa77a31 predict applied ImageNet's 256 / 224 /
    mean / std to this 32 px model and disagreed on most images."""
    digits, best = digits_model
    table = tmp_path / "predictions.csv"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "evaluate.py"), "--checkpoint", str(best), "--predictions", str(table),
                        "--batch-size", "50", "data.loader=torchvision", "data.num_threads=0"],
                       cwd=REPO, env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == [str(path) for path in sorted((digits / "val").glob("*/*.jpg"))]
    assert all(int(r["label"]) == int(Path(r["image"]).parent.name) for r in rows)
    predicted = predicted_top1(best, [r["image"] for r in rows], capsys)
    assert [index for index, _, _ in predicted] == [int(r["top1"]) for r in rows]
    assert all(name == str(index) for index, name, _ in predicted)       # the class folders "0".."9"
    top1 = 100 * sum(int(r["top1"]) == int(r["label"]) for r in rows) / len(rows)
    assert f"top-1 {top1:.2f}%" in p.stdout and top1 > 30               # a model that learned something


@pytest.mark.slow
def test_the_run_settings_travel_with_converted_files_and_beside_the_checkpoint(digits_model, tmp_path, capsys):
    """A checkpoint reduced to its weights takes the evaluation preprocessing and class names from the run's
    {label}.config.yaml beside it; convert_model.py keeps both in the file it writes."""
    digits, best = digits_model
    images = [str(path) for path in sorted((digits / "val").glob("*/*.jpg"))[::36]]
    expected = predicted_top1(best, images, capsys)
    assert all(name == str(index) for index, name, _ in expected)
    save_checkpoint({"state_dict": load_checkpoint(best)["state_dict"]}, tmp_path / "digits_best.pth.tar")
    shutil.copyfile(best.with_name("digits.config.yaml"), tmp_path / "digits.config.yaml")
    assert predicted_top1(tmp_path / "digits_best.pth.tar", images, capsys) == expected
    (tmp_path / "digits.config.yaml").unlink()        # weights alone: ImageNet's preprocessing, output indices
    alone = predicted_top1(tmp_path / "digits_best.pth.tar", images, capsys)
    assert all(name == f"class {index}" for index, name, _ in alone)
    assert [prob for _, _, prob in alone] != [prob for _, _, prob in expected]
    converted = subprocess.run([sys.executable, str(REPO / "convert_model.py"), "--model", "0.25", "--input", str(best),
                                "--output", str(tmp_path / "m.pth.tar")], capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr
    assert predicted_top1(tmp_path / "m.pth.tar", images, capsys) == expected

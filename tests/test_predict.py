"""fdmobilenet.predict with the authors' released 0.25x weights on a real photo (scikit-image's Chelsea)."""
import json
import subprocess
import sys

import pytest
from PIL import Image
from skimage import data

from fdmobilenet.predict import imagenet_classes, main

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(d / "chelsea.jpg", quality=90)
    Image.fromarray(data.coffee()).save(d / "coffee.jpg", quality=90)
    return d


def test_json_output_released_weights_see_a_cat(released_weights, photos):
    done = subprocess.run([sys.executable, "-m", "fdmobilenet.predict", "--checkpoint", str(released_weights),
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

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
    assert main(["--checkpoint", str(released_weights), "--model", "0.25", str(photos / "chelsea.jpg"), str(bad)]) == 1
    assert f"cannot read image {bad}" in capsys.readouterr().err
    assert main(["--checkpoint", str(released_weights), "--model", "0.25", str(tmp_path / "missing.jpg")]) == 1
    assert f"cannot read image {tmp_path / 'missing.jpg'}" in capsys.readouterr().err


def test_wrong_width_names_the_checkpoint(released_weights, photos, capsys):
    assert main(["--checkpoint", str(released_weights), "--model", "1x-FDMobileNet-224",
                 str(photos / "chelsea.jpg")]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {released_weights} does not fit the model" in err and "width_mult" in err

"""Shared fixtures and the markers' rules (registered in setup.cfg).

* ``released_weights``: the authors' released 0.25x checkpoint from ../shared beside the repository; tests
  that use it are marked ``needs_fixture``. Without ../shared they are skipped with the reason, except in
  CI (CI=true), which always has it: there a missing file fails them.
* ``gpu``-marked tests are skipped, with the reason, where torch sees no CUDA device.
* Small ImageFolder trees of real photographs (scikit-image's bundled photos): every image is a crop of a
  real photo, rescaled to 64-160 px and saved as a JPEG, so decoders see real photo content; the trees are
  made once per test session.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

RELEASED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original" / "0.25x-FDMobileNet-224.pth.tar"


def pytest_collection_modifyitems(items):
    for item in items:
        if "released_weights" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_fixture)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False here")


@pytest.fixture(scope="session")
def released_weights() -> Path:
    """The authors' FD-MobileNet 0.25x file (../shared/fixtures/original/, see its README there)."""
    if not RELEASED.is_file():
        why = f"the authors' released weights are not at {RELEASED} (../shared beside the repository)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI always has ../shared, but {why}")
        pytest.skip(why)
    return RELEASED

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "cat",
          "colorwheel")


def make_image_folder(root: Path, counts: list[int], seed: int = 0) -> Path:
    """``root/c{k:02d}/img_{i:03d}.jpg``: ``counts[k]`` crops of photo ``k mod 8`` per class ``k``, each of
    its own size (64-160 px a side) and place; returns ``root``."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = {}
    serial = 0
    for k, n in enumerate(counts):
        name = PHOTOS[k % len(PHOTOS)]
        photo = photos.setdefault(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
        folder = root / f"c{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.4, 0.9)), int(h * rng.uniform(0.4, 0.9))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            size = (int(rng.integers(64, 161)), int(rng.integers(64, 161)))
            img = photo.resize(size, Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
            img.save(folder / f"img_{serial:03d}.jpg", quality=90)
            serial += 1
    return root


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory) -> Path:
    """A dataset root with train/ (3 classes, 4+4+3 = 11 images) and val/ (3 classes, 3+2+2 = 7 images)."""
    root = tmp_path_factory.mktemp("photos")
    make_image_folder(root / "train", [4, 4, 3], seed=1)
    make_image_folder(root / "val", [3, 2, 2], seed=2)
    return root


@pytest.fixture(scope="session")
def unique_root(tmp_path_factory) -> Path:
    """train/ and val/ with 11 classes of ONE image each: a label names its file, so the order and the
    coverage of an epoch can be read off the labels of the real pipeline (labels 10 and up also check
    multi-digit class indices)."""
    root = tmp_path_factory.mktemp("unique")
    make_image_folder(root / "train", [1] * 11, seed=3)
    make_image_folder(root / "val", [1] * 11, seed=4)
    return root

"""The README's "Train on your own images" recipe, run as written: its commands are read from README.md and
run one by one by bash, from a folder that holds the data where the recipe says (data/mine, an ImageFolder of
real photos with class folders named like a user's), the repository's three scripts and a photo.jpg, with
`python` the project's interpreter. The data is smaller than the few hundred images the recipe is measured
on (docs/own-images.md), so that the 30 epochs take seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from conftest import make_image_folder
from launch_support import REPO

CLASSES = ["astronaut", "cat", "coffee", "rocket"]    # crops of these scikit-image photos, in this order
pytestmark = pytest.mark.slow


def recipe_commands() -> list[str]:
    """The command lines of the README section's bash block, comments removed."""
    section = (REPO / "README.md").read_text().split("## Train on your own images\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_recipe_for_own_images_runs_as_written(tmp_path):
    for split, per_class, seed in (("train", 10, 1), ("val", 3, 2)):
        make_image_folder(tmp_path / "data" / "mine" / split, [per_class] * len(CLASSES), seed=seed)
        for k, name in enumerate(CLASSES):
            (tmp_path / "data" / "mine" / split / f"c{k:02d}").rename(tmp_path / "data" / "mine" / split / name)
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "photo.jpg", quality=90)
    for script in ("train_ddp.py", "evaluate.py", "predict.py"):
        (tmp_path / script).symlink_to(REPO / script)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (tmp_path / "bin" / "python").chmod(0o755)
    environment = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}

    commands = recipe_commands()
    assert [c.split()[:2] for c in commands] == [["python", "-m"], ["python", "train_ddp.py"],
                                                 ["python", "evaluate.py"], ["python", "predict.py"]]
    out = {}
    for command in commands:
        p = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=environment, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"{command}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        out[command.split()[1 if command.split()[1] != "-m" else 2]] = p.stdout + p.stderr
    verify, train, evaluate, predict = out["pipelines.verify"], out["train_ddp.py"], out["evaluate.py"], \
        out["predict.py"]
    assert "manifest: data/mine/train/.manifest.tsv" in verify and "0 errors" in verify
    assert "| 4 classes (class folders in data/mine/train) |" in train and "lr 0.1 = 0.1 x 32/32" in train
    assert "| amp off |" in train                       # the CPU's full fp32, not 'amp None'
    assert "files checked" not in train                  # the manifests served: no image read to check it
    assert "done: best val top-1" in train and (tmp_path / "checkpoints" / "mine_best.pth.tar").is_file()
    assert "checkpoints/mine_best.pth.tar on data/mine/val (dali, 1 rank(s), cpu): top-1 " in evaluate
    assert "(12 images)" in evaluate
    lines = predict.splitlines()
    assert lines[0] == "photo.jpg" and len(lines) == 1 + len(CLASSES)     # the top 4 of the 4 classes
    assert sorted(line.split()[2] for line in lines[1:]) == CLASSES

"""ImageFolder trees: the listing torchvision uses, and building a generated tree exactly once.

The listing comes from torchvision itself (``find_classes`` / ``make_dataset``) so that class indices and
sample order here are, by construction, the ones ``torchvision.datasets.ImageFolder`` gives.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

MARKER = ".complete.json"    # written last: its presence with the same parameters means "already built"
BUILDING = ".building"       # written first: marks a half-built tree as ours, safe to delete and redo


def list_samples(split_dir: str | Path, allow_empty: bool = False) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class_names, [(path, class_index), ...])`` in torchvision ImageFolder order; an empty class folder
    is torchvision's FileNotFoundError unless ``allow_empty`` (for callers that name it themselves)."""
    classes, class_to_idx = find_classes(str(split_dir))
    return classes, make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)


def build_once(root: str | Path, params: dict, build: Callable[[Path], None],
               subdirs: tuple[str, ...] = ("train", "val")) -> bool:
    """Run ``build(root)`` unless ``root`` already holds a complete build with the same ``params``.

    Returns True when it built, False when it skipped. A tree that this module did not create (no marker
    files) is never deleted: that is an error naming the directory.
    """
    root = Path(root)
    marker, building = root / MARKER, root / BUILDING
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return False
        except json.JSONDecodeError:
            pass
    elif not building.exists() and any((root / s).exists() for s in subdirs):
        raise FileExistsError(f"{root} already holds {'/'.join(subdirs)} that this tool did not create "
                              f"(no {MARKER}); remove it or choose another directory")
    root.mkdir(parents=True, exist_ok=True)
    building.touch()
    marker.unlink(missing_ok=True)
    for s in subdirs:
        shutil.rmtree(root / s, ignore_errors=True)
    build(root)
    marker.write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    building.unlink()
    return True

"""launch/setup_env.sh's knobs reach pip. The interpreter is a stand-in that records its command lines (a
script: no index can be reached from the test machine, and a real install takes minutes); everything else is
the real script."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from launch_support import LAUNCH

STAND_IN = """#!/bin/bash
echo "$*" >> "$LOG"
case "$1" in
  -c) exit 1 ;;                                               # no torch here yet
  -m) if [[ $2 == venv ]]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
esac
"""


def setup_env(tmp_path: Path, **knobs: str) -> list[str]:
    tmp_path.mkdir()
    (tmp_path / "python").write_text(STAND_IN)
    (tmp_path / "python").chmod(0o755)
    log = tmp_path / "pip.log"
    environment = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX", "TORCH_SPEC", "EXTRAS", "VENV")}
    p = subprocess.run(["bash", str(LAUNCH / "setup_env.sh"), str(tmp_path / "venv")], capture_output=True,
                       text=True, timeout=60, env={**environment, "PYTHON": str(tmp_path / "python"), "LOG": str(log),
                                                   **knobs})
    assert p.returncode == 0, p.stderr
    return [line for line in log.read_text().splitlines() if " pip " in f" {line} "]


def test_torch_index_chooses_where_torch_comes_from(tmp_path):
    cpu = "https://download.pytorch.org/whl/cpu"
    torch, project = setup_env(tmp_path / "cpu", TORCH_INDEX=cpu)
    assert torch.endswith(f"install --index-url {cpu} torch==2.14.1 torchvision==0.29.1")
    assert project.endswith("install -e .[dali,dev]") and "--index-url" not in project   # the rest: PyPI
    torch, _ = setup_env(tmp_path / "default", TORCH_SPEC="torch==2.11.0 torchvision==0.26.0")
    assert torch.endswith("-q install torch==2.11.0 torchvision==0.26.0")

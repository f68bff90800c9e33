"""Every command of the project answers a user's mistake the same way: one line naming what is wrong and what
to do, exit code 2, no traceback (fdmobilenet/cli.py); and none starts with a Python warning of its own.
train_ddp.py, evaluate.py, predict.py and convert_model.py: tests/test_bad_input.py, test_predict.py,
test_convert.py; benchmarks.accuracy_table: test_accuracy_table.py; pipelines.imagenet's archive mistakes:
test_imagenet_archives.py."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from launch_support import REPO
from pipelines import demo_data, pack, photo_set, verify

def test_verify_starts_without_a_warning():
    """At fa77a31 every `python -m pipelines.verify` (even --help) started with runpy's RuntimeWarning ('found in
    sys.modules'): the package's __init__ had imported the module already. With warnings made errors it runs."""
    p = subprocess.run([sys.executable, "-W", "error", "-m", "pipelines.verify", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    assert p.stdout.startswith("usage: python -m pipelines.verify")


def test_light_data_modules_load_no_torch():
    """The package and the modules that do not use torch import without it: `python -m pipelines.hw_decoder`
    probes the JPEG decoder before anything loads torch, and a tool's start does not pay for it."""
    light = ["pipelines", "pipelines.defaults", "pipelines.hw_decoder", "pipelines.manifest", "pipelines.progress"]
    p = subprocess.run([sys.executable, "-c", f"import sys; import {', '.join(light)}; "
                        f"print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout.strip()) == (0, "[]"), p.stderr


def test_loaders_import_no_command_module():
    """What training imports of the data package holds no command (`python -m pipelines.<tool>`): a command's
    module is the command's, and importing it first makes runpy warn when the command runs."""
    training = ["pipelines", "pipelines.splits", "pipelines.integrity", "pipelines.synthetic",
                "pipelines.torchvision_loader", "pipelines.dali"]
    commands = ["pipelines.verify", "pipelines.pack", "pipelines.resize", "pipelines.imagenet",
                "pipelines.demo_data", "pipelines.photo_set", "pipelines.hw_decoder"]
    p = subprocess.run([sys.executable, "-c", f"import sys; import {', '.join(training)}; "
                        f"print(sorted(m for m in {commands!r} if m in sys.modules))"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout.strip()) == (0, "[]"), p.stderr


def one_line(capsys, prog: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), captured.err
    return lines[0]


def test_dataset_tools_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "theirs" / "train" / "x").mkdir(parents=True)       # a tree the tools did not write
    assert verify.main([str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: not a directory" in one_line(capsys, "pipelines.verify")
    assert pack.main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "shards")]) == 2
    assert f"{tmp_path / 'missing'}: not a directory" in one_line(capsys, "pipelines.pack")
    assert pack.main(["--src", str(tmp_path / "theirs" / "train"), "--dst", str(tmp_path / "s"),
                      "--shard-size", "0"]) == 2
    assert "--shard-size must be at least 1, got 0" in one_line(capsys, "pipelines.pack")
    assert demo_data.main([str(tmp_path / "digits"), "--size", "4"]) == 2
    assert "--size must be at least 8" in one_line(capsys, "pipelines.demo_data")
    assert demo_data.main([str(tmp_path / "theirs")]) == 2
    assert "this tool did not create" in one_line(capsys, "pipelines.demo_data")
    assert photo_set.main([str(tmp_path / "photos"), "--num-train", "2", "--num-val", "1", "--classes", "3"]) == 2
    assert "need at least one train image per class" in one_line(capsys, "pipelines.photo_set")
    assert photo_set.main([str(tmp_path / "theirs"), "--num-train", "3", "--num-val", "0", "--classes", "3"]) == 2
    assert "this tool did not create" in one_line(capsys, "pipelines.photo_set")


def test_evaluate_help_explains_labels_from_folder_names(capsys):
    """At fa77a31 the option's help said 'see above', with nothing above it."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "see above" not in text
    assert "--labels-from-folder-names the val class folders are named by the model's output index" in text

"""benchmarks.accuracy_table on runs made up here (a config.yaml and a per-epoch log, as train_ddp.py writes
them): which epoch is "best" and which "final", the difference to the paper's top-1 and where it is left out,
and the exit code of a mistake. The table of real runs: tests/test_reproduce_table.py."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.accuracy_table import main
from fdmobilenet.config import load_experiment, to_dict
from launch_support import REPO


def made_up_run(folder: Path, label: str, top1: list[float], *overrides: str) -> Path:
    """``label``'s config.yaml and one jsonl row per epoch, val top-1 as given (top-5 = top-1 + 20)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_experiment("0.25x-FDMobileNet-224", overrides=[f"optim.epochs={len(top1)}", "data.num_classes=1000",
                                                              f"train.label={label}", *overrides])
    run = {"git_commit": "0123456789abcdef", "git_dirty": False, "world_size": 2, "device": "CPU (2 cores)"}
    (folder / f"{label}.config.yaml").write_text(yaml.safe_dump({"run": run, **to_dict(cfg)}, sort_keys=False))
    rows = [{"epoch": e + 1, "img_s": 100.0 * (e + 1), "epoch_time_s": 36.0, "val_top1": t, "val_top5": t + 20}
            for e, t in enumerate(top1)]
    (folder / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def table(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_best_is_the_best_epoch_and_final_the_last(tmp_path):
    """val top-1 50 % then 40 %: best 50, final 40, and the difference to the paper's 45.1 % (0.25x) is the
    final one's, -5.1."""
    runs = made_up_run(tmp_path / "runs", "imagenet", [50.0, 40.0])
    rc, out, _ = table(str(runs), "--format", "csv")
    assert rc == 0
    row = next(r for r in csv.DictReader(io.StringIO(out)) if r["run"] == str(runs / "imagenet"))
    assert (row["top1_best"], row["top5_best"], row["top1_final"], row["top5_final"]) == ("50", "70", "40", "60")
    assert float(row["top1_diff"]) == pytest.approx(40.0 - 45.1)
    assert (row["paper_top1"], row["epochs_done"], row["epochs_planned"], row["status"]) == ("45.1", "2", "2", "done")
    assert row["data"] == "imagenet-aggressive, 1000 classes" and row["img_s"] == "200"   # epoch 1 left out
    rc, out, _ = table(str(runs), "--format", "markdown")
    line = next(line for line in out.splitlines() if line.endswith(f"| {runs / 'imagenet'} |"))
    assert "| 45.1 | 40.00 | 60.00 | 50.00 | 70.00 | -5.10 | 2/2 | done |" in line


def test_a_run_on_other_data_gets_no_difference_to_imagenets_number(tmp_path):
    runs = made_up_run(tmp_path / "runs", "digits", [90.0, 99.0], "data.name=digits-demo", "data.num_classes=10")
    rc, out, _ = table(str(runs))
    assert rc == 0
    markdown, notes, text = out.split("\n\n")
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["run"] == str(runs / "digits"))
    assert row["data"] == "digits-demo, 10 classes" and row["top1_final"] == "99" and row["top1_diff"] == ""
    assert "| digits-demo, 10 classes | 45.1 | 99.00 |" in markdown and "| - | 2/2 | done |" in markdown
    assert "for runs on 1000-class data (ImageNet) only" in notes


def test_released_weights_say_which_val_folder_they_are_scored_on_and_why(tmp_path, released_weights):
    runs = made_up_run(tmp_path / "runs", "digits", [90.0], "data.name=digits-demo", "data.num_classes=10",
                       f"data.root={tmp_path / 'digits'}")
    rc, _, err = table(str(runs), "--released", str(released_weights), "--format", "csv")
    assert rc == 0
    assert (f"accuracy_table: scoring {released_weights} with evaluate.py on {tmp_path / 'digits'}/val (the val "
            f"split of run {runs / 'digits'}, the first run given; --val-root DIR for another) ...") in err
    rc, _, err = table("--released", str(released_weights), "--val-root", str(tmp_path / "photos"))
    assert rc == 0 and f"on {tmp_path / 'photos'}/val (--val-root) ..." in err


def test_a_mistake_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks.accuracy_table", str(tmp_path / "nowhere")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (f"accuracy_table: {tmp_path / 'nowhere'}: not found (give a run's output folder or its "
                        f"{{label}}.config.yaml)\n")
    rc, _, err = table(str(tmp_path), "--format", "csv")
    assert rc == 2 and err.startswith(f"accuracy_table: {tmp_path}: no run here")

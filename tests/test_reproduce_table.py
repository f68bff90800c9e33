"""The paper's three runs in one command, and the table of them, on the digits demo at tiny size: widths 1x,
0.5x and 0.25x of FD-MobileNet on scikit-learn's real handwritten digits at 32 px, two epochs of 40 steps each,
2 CPU ranks on gloo, the DALI CPU pipeline - the full trainer through the project's launch scripts.

* launch/reproduce_table.sbatch on a real one-node SLURM cluster (tests/test_launch_slurm.py's fixture): a job
  array of the three widths; SIGUSR1 to one element's batch shell (what --signal=B:USR1@120 sends before the
  time limit) goes through slurm.sbatch's trap: checkpoint, requeue of that element alone, resume. The table
  of the three runs (benchmarks.accuracy_table): every number equals what the run's logs, checkpoint and the
  FLOPs counter say (read here from the files, not typed in).
* launch/reproduce_table.sh runs the widths one after another (here WIDTHS="0.5x 0.25x", to keep CI short). A
  SIGTERM to the job (its process group, as a scheduler or a shell sends it) while the first width trains
  stops the script; that run has checkpointed, and the table shows it in progress and the other widths as
  "no run"; the same command again resumes it and runs the next width.
* The authors' released 0.25x weights scored by evaluate.py in an extra row of the table.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdmobilenet.checkpoint import load_checkpoint
from fdmobilenet.config import load_experiment, read_yaml
from fdmobilenet.flops import count_macs, count_params
from fdmobilenet.model import FDMobileNet
from launch_support import LAUNCH, REPO, build_digits, run, start, tail, wait_for
from slurm_support import running_cluster

from benchmarks.accuracy_table import main as table_main, read_rows

WIDTHS = {"1x": 1.0, "0.5x": 0.5, "0.25x": 0.25}
PAPER_TOP1 = {1.0: 65.3, 0.5: 56.3, 0.25: 45.1}     # FD-MobileNet, Qin et al. 2018
STEPS = 40
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster (launch/slurm_localhost) for this module's SLURM test."""
    yield from running_cluster(LAUNCH / "slurm_localhost" / "slurm-start.sh", LAUNCH / "slurm_localhost" / "slurm-stop.sh")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> str:
    """One experiment file per width ({width}-digits.yaml): the digits data, the demo's kind of recipe
    (warmup, cosine) at a global batch of 16, two epochs of STEPS steps; TABLE_EXPERIMENT's template."""
    d = tmp_path_factory.mktemp("experiments")
    for name, width in WIDTHS.items():
        (d / f"{name}-digits.yaml").write_text(
            f"data: digits-demo\n"
            f"model: {{name: {name}-FDMobileNet-32, width_mult: {width}}}\n"
            f"optim: {{name: SGD-tiny, lr: 0.2, batch_size: 16, base_batch_size: 64, epochs: 2, "
            f"warmup_epochs: 0.5}}\n"
            f"sched: Cosine\n"
            f"train: {{print_freq: 1, steps_per_epoch: {STEPS}, plot: false}}\n")
    return str(d / "{width}-digits.yaml")


def words(digits: Path) -> list[str]:
    return [f"data.root={digits}", "data.crop_size=32", "data.val_resize=36", "data.val_crop=32"]


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def table(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert table_main(list(argv)) == 0
    return out.getvalue()


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def check_runs_recorded(runs: Path, widths: list[str]) -> None:
    """Each width ran to the end and recorded its commit and resolved config."""
    for name in widths:
        width = WIDTHS[name]
        cfg = read_yaml(runs / f"{name}-digits.config.yaml")
        assert cfg["run"]["git_commit"] == head_commit() and cfg["run"]["world_size"] == 2
        assert f"--label {name}-digits" in cfg["run"]["command"]
        assert (cfg["model"]["width_mult"], cfg["optim"]["epochs"], cfg["train"]["output_dir"]) == (width, 2, str(runs))
        ck = load_checkpoint(runs / f"{name}-digits.pth.tar")
        assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (2, 0, 2 * STEPS)


def check_table(runs: Path) -> None:
    """The table CLI on the three finished runs: every number from the logs / checkpoint / flops counter."""
    p = subprocess.run([sys.executable, "-m", "benchmarks.accuracy_table", str(runs)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    md, notes, csv_text = p.stdout.split("\n\n")                     # markdown table, its notes, CSV
    assert notes.startswith("MFLOPs: multiply-adds per image")
    rows = {r["run"]: r for r in csv_rows(csv_text)}
    assert list(rows) == [str(runs / f"{name}-digits") for name in WIDTHS]       # 1x, 0.5x, 0.25x
    for name, width in WIDTHS.items():
        r, logged = rows[str(runs / f"{name}-digits")], read_rows(runs / f"{name}-digits.jsonl")
        assert len(logged) == 2
        with torch.device("meta"):
            model = FDMobileNet(width, num_classes=10)
        top1, top5 = [e["val_top1"] for e in logged], [e["val_top5"] for e in logged]
        expected = {"width": width, "px": 32, "mflops": count_macs(model, 32) / 1e6, "params": count_params(model),
                    "paper_top1": PAPER_TOP1[width],
                    "top1_final": top1[-1], "top5_final": top5[-1], "top1_best": max(top1), "top5_best": max(top5),
                    "epochs_done": 2, "epochs_planned": 2, "img_s": logged[1]["img_s"],   # median of epochs 2..
                    "device_hours": 2 * sum(e["epoch_time_s"] for e in logged) / 3600}
        for key, value in expected.items():
            assert float(r[key]) == pytest.approx(value, rel=1e-5, abs=1e-9), (name, key, r[key], value)
        assert r["status"] == "done" and r["devices"].startswith("2 x CPU")
        assert r["data"] == "digits-demo, 10 classes" and r["top1_diff"] == ""   # the paper's number is ImageNet's
        assert r["commit"].split("+")[0] == head_commit()[:12]
        md_row = next(line for line in md.splitlines() if line.endswith(f"| {runs / name}-digits |"))
        assert f"| {width:g}x | 32 |" in md_row and "| 2/2 | done |" in md_row and f"| {top1[-1]:.2f} |" in md_row


def test_by_default_each_width_runs_the_papers_recipe():
    """What both launchers run when nothing is set (launch/table_runs.sh): per width its experiment file, which
    composes the paper's recipe: imagenet-aggressive (RandomResizedCrop 224, area 0.36-1; val 256 -> 224),
    SGD lr 0.1 nesterov momentum 0.9 wd 4e-5 at a global batch of 256 for 120 epochs, lr / 10 every 30."""
    p = subprocess.run(["bash", "-c", 'source launch/table_runs.sh; for w in "${TABLE_WIDTHS[@]}"; do '
                        'table_run_args "$w"; echo "${RUN_ARGS[*]}"; done'], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                   if k not in ("WIDTHS", "TABLE_DIR", "TABLE_EXPERIMENT")})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines == [f"--config configs/experiments/{w}-FDMobileNet-224.yaml --label {w}-FDMobileNet-224 "
                     f"train.output_dir=checkpoints/table" for w in WIDTHS]
    for name, width in WIDTHS.items():
        cfg = load_experiment(str(REPO / f"configs/experiments/{name}-FDMobileNet-224.yaml"))
        d, o, s = cfg.data, cfg.optim, cfg.sched
        # num_classes auto: ImageNet's 1000 class folders (tests/test_config.py, on ImageNet's tree)
        assert cfg.model.width_mult == width and (d.name, d.num_classes, d.train_crop) == \
            ("imagenet-aggressive", "auto", "random_resized")
        assert (d.crop_size, d.scale, d.hflip, d.val_resize, d.val_crop) == (224, (0.36, 1.0), True, 256, 224)
        assert (o.lr, o.momentum, o.weight_decay, o.nesterov, o.batch_size, o.base_batch_size, o.epochs) == \
            (0.1, 0.9, 4e-5, True, 256, 256, 120)
        assert (o.warmup_epochs, o.label_smoothing, o.ema_decay, o.no_wd_bn_bias) == (0.0, 0.0, 0.0, False)
        assert (s.type, s.step_size, s.gamma) == ("step", 30, 0.1)


# ------------------------------------------------------------------------------------ one node, no SLURM
@pytest.fixture(scope="module")
def sh_runs(tmp_path_factory, digits, experiments):
    """reproduce_table.sh stopped by SIGTERM while its first width trains, the table then, the same command again."""
    d = tmp_path_factory.mktemp("sh")
    cmd, extra = ["bash", str(LAUNCH / "reproduce_table.sh"), *words(digits)], \
        {"TABLE_EXPERIMENT": experiments, "TABLE_DIR": str(d / "runs"), "WIDTHS": "0.5x 0.25x"}
    p = start(cmd, d / "first.log", **extra)
    try:
        wait_for(d / "first.log", r"epoch 1/2 step 1/", 300, p)
        os.killpg(p.pid, signal.SIGTERM)
        first_rc = p.wait(timeout=30)
        deadline = time.monotonic() + 120          # torchrun (same group) lets its workers checkpoint, then ends
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the interrupted job did not end; log:\n{tail(d / 'first.log')}")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        raise
    in_progress = table(str(d / "runs"), "--format", "csv")
    stopped_at = load_checkpoint(d / "runs" / "0.5x-digits.pth.tar")
    rc, second = run(cmd, d / "second.log", timeout=600, **extra)
    return {"runs": d / "runs", "digits": digits, "first": (d / "first.log").read_text(), "first_rc": first_rc,
            "in_progress": in_progress, "stopped_at": (stopped_at["epoch"], stopped_at["step_in_epoch"]),
            "second": second, "second_rc": rc}


def test_plain_script_runs_the_widths_in_turn_and_resumes_after_a_sigterm(sh_runs):
    first, second, runs = sh_runs["first"], sh_runs["second"], sh_runs["runs"]
    assert sh_runs["first_rc"] == -signal.SIGTERM
    assert "reproduce_table: 0.5x: launch/local.sh --config" in first and "preempted (SIGTERM) at epoch" in first
    assert "reproduce_table: 0.25x" not in first                    # stopped, not run on to the next width
    assert sh_runs["second_rc"] == 0, second[-4000:]
    assert f"resumed from {runs / '0.5x-digits.pth.tar'}" in second
    assert second.index("reproduce_table: 0.5x:") < second.index("reproduce_table: 0.25x:")
    assert "reproduce_table: 0.5x 0.25x done; the table:" in second
    check_runs_recorded(runs, ["0.5x", "0.25x"])


def test_table_shows_a_run_in_progress_and_widths_without_a_run(sh_runs):
    rows = {r["width"]: r for r in csv_rows(sh_runs["in_progress"])}
    assert list(rows) == ["1", "0.5", "0.25"]
    epoch, step = sh_runs["stopped_at"]                                 # the checkpoint of the stopped run
    assert int(rows["0.5"]["epochs_done"]) == epoch < 2 and rows["0.5"]["epochs_planned"] == "2"
    assert rows["0.5"]["status"] == "in progress" + (f" (epoch {epoch + 1} at step {step})" if step else "")
    for width in ("1", "0.25"):
        assert rows[width]["status"] == "no run" and rows[width]["top1_final"] == ""
        assert rows[width]["paper_top1"] == str(PAPER_TOP1[float(width)])


def test_released_weights_scored_by_evaluate_in_an_extra_row(sh_runs, released_weights, tmp_path):
    """On the runs' own val split (digits) the released ImageNet weights cannot be scored, and the row says
    why; on three real photos filed under their ImageNet index (as tests/test_train_runs.py) evaluate.py
    scores them: the cat and the espresso top-1, the rocket (missile) only in the top 5."""
    rows = csv_rows(table(str(sh_runs["runs"]), "--released", str(released_weights), "--format", "csv"))
    released = rows[-1]
    assert released["run"] == str(released_weights) and released["width"] == "0.25" and released["px"] == "224"
    assert released["status"].startswith(f"not scored on {sh_runs['digits']}/val: evaluate.py exit 2: evaluate.py: ")
    assert f"{sh_runs['digits']}/val has 10 class folders but {released_weights} has 1000 outputs" in released["status"]
    assert float(released["mflops"]) == pytest.approx(12.037952, rel=1e-5) and released["params"] == "383160"

    import skimage.data
    from PIL import Image
    for index, photo in ((285, "chelsea"), (967, "coffee"), (657, "rocket")):
        (tmp_path / "val" / str(index)).mkdir(parents=True)
        Image.fromarray(getattr(skimage.data, photo)()).save(tmp_path / "val" / str(index) / f"{photo}.jpg", quality=95)
    text = table(str(sh_runs["runs"]), "--released", str(released_weights), "--val-root", str(tmp_path),
                 "--labels-from-folder-names")
    released = csv_rows(text.split("\n\n")[-1])[-1]
    assert (float(released["top1_final"]), float(released["top5_final"])) == (pytest.approx(66.67, abs=0.01), 100.0)
    assert released["top1_diff"] == ""     # 3 of ImageNet's classes: not comparable with the paper's top-1
    assert released["status"] == f"released weights, evaluate.py on {tmp_path}/val (3 images)"


# ------------------------------------------------------------------------------------------ SLURM array
@pytest.mark.slurm
def test_slurm_job_array_runs_the_three_widths_and_a_requeued_element_resumes(slurm, digits, experiments,
                                                                              tmp_path):
    runs = tmp_path / "runs"
    p = subprocess.run(["sbatch", "--parsable", "-t", "8", "-o", f"{tmp_path}/%x-%A_%a.out",
                        str(LAUNCH / "reproduce_table.sbatch"), *words(digits)], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=slurm.env(TABLE_EXPERIMENT=experiments, TABLE_DIR=str(runs)))
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    job = int(p.stdout.strip().split(";")[0])
    outputs = [tmp_path / f"fdmobilenet-table-{job}_{i}.out" for i in range(3)]
    wait_for(outputs[2], r"epoch 1/2 step 3/", 400)
    slurm.scancel("--signal=USR1", "--batch", f"{job}_2")
    states = [slurm.wait(f"{job}_{i}", timeout=400) for i in range(3)]
    texts = [o.read_text(errors="replace") if o.exists() else "(no output)" for o in outputs]
    for i, (state, text) in enumerate(zip(states, texts)):
        assert state.endswith("COMPLETED ExitCode=0:0"), f"element {i}: {state}\n{text[-4000:]}"
        assert f"reproduce_table: array element {i} = {list(WIDTHS)[i]}" in text
        assert "1 node(s), rendezvous localhost:" in text and "localhost: torchrun with 2 worker(s)" in text
    assert "(restart 1)" not in texts[0] + texts[1], texts[0][-3000:] + texts[1][-3000:]   # only element 2
    first, sep, second = texts[2].partition("(restart 1)")
    assert sep, f"element 2 did not run a second time:\n{texts[2][-4000:]}"
    assert "batch shell: SIGUSR1 -> step" in first and f"requeueing job {job}_2 " in first
    assert f"resumed from {runs / '0.25x-digits.pth.tar'}" in second
    check_runs_recorded(runs, list(WIDTHS))
    check_table(runs)

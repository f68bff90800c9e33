"""The paper's accuracy table beside this project's runs, printed as markdown and CSV.

    python -m benchmarks.accuracy_table checkpoints/table [RUN_DIR | {label}.config.yaml ...] \\
        [--released ../shared/fixtures/original/0.25x-FDMobileNet-224.pth.tar ...] [--val-root DIR] \\
        [--labels-from-folder-names] [--format both|markdown|csv]

(from the repository root). One row per run (read from its {label}.config.yaml, .jsonl and .pth.tar, finished
or still running): width; MFLOPs (multiply-adds, the paper's "FLOPs") and parameters
counted by fdmobilenet.flops for the run's model (its num_classes) at its val crop; the run's data (its data
config's name and class count); the paper's top-1; the run's final and best val top-1 / top-5, final top-1
minus the paper's (for runs on 1000-class data only: the paper's number is ImageNet's, and a difference to a
run on other data would compare nothing); epochs completed of planned and the run's status; median epoch
img/s; device-hours (ranks x summed training epoch time: GPU-hours for GPU runs, process-hours for CPU runs);
devices; commit. A width of the paper without a run gets a "no run" row.

--released FILE: weights released by the authors, scored by evaluate.py (one process) with
imagenet-aggressive's evaluation preprocessing (the one the weights were trained with) on DIR/val with
--val-root DIR, else on the val split of the first run given (its data.root, val_split, layout and loader);
the choice is printed, with why, and each file gets one extra row. --labels-from-folder-names goes to
evaluate.py (class folders named by the model's output index): a folder of only some of ImageNet's classes,
so such a row gets no difference to the paper's top-1 either.

Exit codes: 0 printed; 2 a mistake (a run folder or file that is missing or damaged, --released without a val
split: one line); 1 anything else (a traceback).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fdmobilenet import cli
from fdmobilenet.checkpoint import CONFIG_SUFFIX, CheckpointSaver, load_checkpoint, model_config
from fdmobilenet.config import ConfigError, ExperimentConfig, from_dict, load_experiment, read_yaml
from fdmobilenet.flops import count_macs, count_params
from fdmobilenet.model import FDMobileNet

REPO = Path(__file__).resolve().parents[1]
PROG = "accuracy_table"
# FD-MobileNet (Qin et al., ICIP 2018): ImageNet val top-1 (%) at 224 px, per width.
PAPER_TOP1 = {1.0: 65.3, 0.5: 56.3, 0.25: 45.1}
IMAGENET_CLASSES = 1000   # a run on data of another class count gets no difference to the paper's top-1
RELEASED_DATA = "imagenet-aggressive"
# evaluate.py's result line (fdmobilenet.logs.format_metrics)
SCORE = re.compile(r"top-1 ([\d.]+)%\s+top-5 ([\d.]+)%\s+loss \S+\s+\((\d+) images\)")

# (CSV name, markdown header, markdown format)
COLUMNS = [("width", "width", "{:g}x"), ("px", "px", "{}"), ("mflops", "MFLOPs", "{:.1f}"),
           ("params", "params", "{:,}"), ("data", "data", "{}"), ("paper_top1", "paper top-1", "{:.1f}"),
           ("top1_final", "top-1 final", "{:.2f}"), ("top5_final", "top-5 final", "{:.2f}"),
           ("top1_best", "top-1 best", "{:.2f}"), ("top5_best", "top-5 best", "{:.2f}"),
           ("top1_diff", "Δ top-1", "{:+.2f}"), ("epochs_done", "epochs", "{}"), ("epochs_planned", None, "{}"),
           ("status", "status", "{}"), ("img_s", "img/s", "{:,.0f}"), ("device_hours", "device-h", "{:.3g}"),
           ("devices", "devices", "{}"), ("commit", "commit", "{}"), ("run", "run", "{}")]
NOTES = ("MFLOPs: multiply-adds per image (the paper's FLOPs), counted by fdmobilenet.flops for each run's model "
         "at its val crop (px). Δ top-1: final top-1 minus the paper's, for runs on 1000-class data (ImageNet) "
         "only: the paper's top-1 is ImageNet's, so a run on other data (see data) gets none. img/s: median "
         "training img/s per epoch (the first epoch left out when there are more). device-h: ranks × training "
         "time of the logged epochs, evaluation not included (GPU-hours on GPUs; on a CPU the ranks are "
         "processes). Paper: FD-MobileNet, Qin et al., ICIP 2018, ImageNet val top-1 at 224 px.")


# ------------------------------------------------------------------------------------------------ the runs
@dataclass
class Run:
    """A training run read back from what it wrote, finished or in progress: {label}.config.yaml (the resolved
    config; its ``run:`` section holds git commit, command, device, world size), {label}.jsonl (a row of
    metrics per epoch) and {label}.pth.tar (the latest checkpoint). The epochs completed are the
    checkpoint's (with ``step_in_epoch`` > 0 it stopped inside the next one), or the rows while there is none:
    nothing depends on whether a row's ``epoch`` counts from 0 or 1."""
    label: str
    dir: Path
    config: ExperimentConfig
    meta: dict             # the config file's run: section
    rows: list[dict]       # per-epoch metrics, in the order written
    epochs_done: int
    step_in_epoch: int     # > 0: stopped (preempted) inside epoch epochs_done + 1

    @property
    def epochs_planned(self) -> int:
        return self.config.optim.epochs

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.epochs_planned

    def values(self, key: str) -> list[float]:
        """The column ``key`` over the epochs that have it (validation can be skipped on some epochs)."""
        return [r[key] for r in self.rows if isinstance(r.get(key), (int, float))]

    def final(self, key: str) -> float | None:
        v = self.values(key)
        return v[-1] if v else None

    def best(self, key: str) -> float | None:
        v = self.values(key)
        return max(v) if v else None

    def median_img_s(self) -> float | None:
        """Median training img/s per epoch; the first epoch (compilation, warm-up) left out when there are more."""
        v = self.values("img_s")
        return statistics.median(v[1:] if len(v) > 1 else v) if v else None

    def device_hours(self) -> float:
        """Ranks x the training time of the logged epochs (evaluation not included), in hours."""
        return self.meta.get("world_size", 1) * sum(self.values("epoch_time_s")) / 3600


def read_rows(path: Path) -> list[dict]:
    """The JSON-lines rows; a last line still being written by a running job is left out."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise ConfigError(f"{path}: line {k + 1} is not JSON; the run log is damaged") from None
    return rows


def read_run(config_path: str | Path) -> Run:
    config_path = Path(config_path)
    if not config_path.name.endswith(CONFIG_SUFFIX):
        raise ConfigError(f"{config_path}: not a run's config (expected {{label}}{CONFIG_SUFFIX}, written by "
                          f"train_ddp.py when a run starts)")
    raw = read_yaml(config_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: not a run's config (a mapping with run, data, model, ... sections)")
    label, folder = config_path.name[:-len(CONFIG_SUFFIX)], config_path.parent
    rows = read_rows(folder / f"{label}.jsonl")
    ckpt_path = CheckpointSaver(folder, label).path
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        done, step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
    else:
        done, step = len(rows), 0
    return Run(label=label, dir=folder, config=from_dict(raw, str(config_path)), meta=raw.get("run") or {},
               rows=rows, epochs_done=done, step_in_epoch=step)


def find_runs(*paths: str | Path) -> list[Run]:
    """Every run under ``paths``: a run's {label}.config.yaml, or a folder (each config file in it is a run)."""
    runs = []
    for p in map(Path, paths):
        if p.is_dir():
            configs = sorted(p.glob(f"*{CONFIG_SUFFIX}"))
            if not configs:
                raise ConfigError(f"{p}: no run here (no *{CONFIG_SUFFIX}; train_ddp.py writes "
                                  f"{{output_dir}}/{{label}}{CONFIG_SUFFIX} when a run starts)")
            runs += [read_run(c) for c in configs]
        elif p.is_file():
            runs.append(read_run(p))
        else:
            raise ConfigError(f"{p}: not found (give a run's output folder or its {{label}}{CONFIG_SUFFIX})")
    return runs


# ------------------------------------------------------------------------------------------------ the rows
def model_cost(width: float, num_classes: int, px: int) -> tuple[float, int]:
    """(MFLOPs, parameters) of FD-MobileNet ``width`` with ``num_classes`` outputs at ``px`` (meta device: no
    weights are made)."""
    with torch.device("meta"):
        model = FDMobileNet(width, num_classes=num_classes)
    return count_macs(model, px) / 1e6, count_params(model)


def run_row(run: Run) -> dict:
    cfg, meta = run.config, run.meta
    width, px = cfg.model.width_mult, cfg.data.val_crop
    mflops, params = model_cost(width, cfg.data.num_classes, px)
    paper, final = PAPER_TOP1.get(width), run.final("val_top1")
    comparable = paper is not None and final is not None and cfg.data.num_classes == IMAGENET_CLASSES
    status = "done" if run.finished else "in progress"
    if not run.finished and run.step_in_epoch:
        status += f" (epoch {run.epochs_done + 1} at step {run.step_in_epoch})"
    commit = str(meta.get("git_commit", "unknown"))[:12] + ("+dirty" if meta.get("git_dirty") else "")
    return {"width": width, "px": px, "mflops": mflops, "params": params,
            "data": f"{cfg.data.name}, {cfg.data.num_classes} classes", "paper_top1": paper,
            "top1_final": final, "top5_final": run.final("val_top5"), "top1_best": run.best("val_top1"),
            "top5_best": run.best("val_top5"), "top1_diff": final - paper if comparable else None,
            "epochs_done": run.epochs_done, "epochs_planned": run.epochs_planned, "status": status,
            "img_s": run.median_img_s(), "device_hours": run.device_hours(),
            "devices": f"{meta.get('world_size', '?')} x {meta.get('device', '?')}", "commit": commit,
            "run": str(run.dir / run.label)}


def val_split_of(runs: list[Run], val_root: Path | None) -> tuple[dict[str, str], str]:
    """data.* overrides that point evaluate.py at the val split the released weights are scored on, and why
    that one."""
    if val_root is not None:
        return {"root": str(val_root), "val_split": "val", "layout": "folder"}, "--val-root"
    if not runs:
        raise ConfigError("--released needs a val split: give a run (its data.root) or --val-root DIR")
    d = runs[0].config.data
    return ({"root": d.root, "val_split": d.val_split, "layout": d.layout, "loader": d.loader},
            f"the val split of run {runs[0].dir / runs[0].label}, the first run given; --val-root DIR for another")


def released_row(path: Path, data: dict[str, str], why: str, labels_from_folder_names: bool) -> dict:
    """The released weights scored by evaluate.py; a failure is shown in the row's status."""
    model, num_classes = model_config(load_checkpoint(path), str(path))
    width = model.width_mult
    px = load_experiment(data=RELEASED_DATA).data.val_crop
    mflops, params = model_cost(width, num_classes, px)
    cmd = [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(path), "--data", RELEASED_DATA,
           "--model", f"{width:g}", *(f"data.{k}={v}" for k, v in data.items()),
           *(["--labels-from-folder-names"] if labels_from_folder_names else [])]
    val = f"{data['root']}/{data['val_split']}"
    print(f"{PROG}: scoring {path} with evaluate.py on {val} ({why}) ...", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    m = SCORE.search(p.stdout) if p.returncode == 0 else None
    top1, top5 = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    if m:
        status = f"released weights, evaluate.py on {val} ({m.group(3)} images)"
    else:
        lines = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()]
        status = f"not scored on {val}: evaluate.py exit {p.returncode}: {lines[-1] if lines else 'no output'}"
    paper = PAPER_TOP1.get(width)
    # without --labels-from-folder-names evaluate.py scores only a folder of all of the model's classes
    comparable = top1 is not None and paper is not None and num_classes == IMAGENET_CLASSES \
        and not labels_from_folder_names
    return {"width": width, "px": px, "mflops": mflops, "params": params,
            "data": f"{val}" + (", some of ImageNet's classes" if labels_from_folder_names else ""),
            "paper_top1": paper, "top1_final": top1, "top5_final": top5,
            "top1_diff": top1 - paper if comparable else None, "status": status, "run": str(path)}


def missing_rows(rows: list[dict]) -> list[dict]:
    """A 'no run' row for each width of the paper that no run has."""
    have = {r["width"] for r in rows}
    out = []
    for width, paper in PAPER_TOP1.items():
        if width not in have:
            mflops, params = model_cost(width, 1000, 224)
            out.append({"width": width, "px": 224, "mflops": mflops, "params": params, "paper_top1": paper,
                        "status": "no run"})
    return out


def markdown(rows: list[dict]) -> str:
    cols = [(key, head, fmt) for key, head, fmt in COLUMNS if head]

    def cell(row: dict, key: str, fmt: str) -> str:
        if key == "epochs_done" and row.get(key) is not None:
            return f"{row['epochs_done']}/{row['epochs_planned']}"
        value = row.get(key)
        return "-" if value is None else fmt.format(value).replace("|", "\\|")

    lines = ["| " + " | ".join(head for _, head, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, key, fmt) for key, _, fmt in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + NOTES + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[key for key, _, _ in COLUMNS], restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items() if v is not None})
    return buf.getvalue()


def table(run_paths: list[str], released: list[Path], val_root: Path | None,
          labels_from_folder_names: bool) -> list[dict]:
    runs = find_runs(*run_paths)
    rows = sorted((run_row(r) for r in runs), key=lambda r: (-r["width"], r["run"]))
    rows = sorted(rows + missing_rows(rows), key=lambda r: -r["width"])
    if released:
        data, why = val_split_of(runs, val_root)
        rows += [released_row(p, data, why, labels_from_folder_names) for p in released]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", metavar="RUN_DIR",
                    help="a run's output folder (every {label}.config.yaml in it) or one {label}.config.yaml")
    ap.add_argument("--released", nargs="+", type=Path, default=[], metavar="FILE",
                    help="released checkpoints to score with evaluate.py on the same val split (extra rows)")
    ap.add_argument("--val-root", type=Path, help="score the released checkpoints on DIR/val instead")
    ap.add_argument("--labels-from-folder-names", action="store_true",
                    help="evaluate.py option: class folders are named by output index")
    ap.add_argument("--format", choices=("both", "markdown", "csv"), default="both")
    args = ap.parse_args(argv)
    if not args.runs and not args.released:
        ap.error("give at least one RUN_DIR (or --released with --val-root)")
    try:
        rows = table(args.runs, args.released, args.val_root, args.labels_from_folder_names)
    except cli.USER_ERRORS as e:
        cli.report(PROG, e)
        return cli.EXIT_USAGE
    if args.format in ("both", "markdown"):
        print(markdown(rows))
    if args.format in ("both", "csv"):
        print(to_csv(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

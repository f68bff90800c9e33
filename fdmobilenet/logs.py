"""What a run leaves behind, written by rank 0 only: console lines (a progress bar on a terminal), the resolved
config with the code version, per-epoch CSV and JSON-lines summaries, TensorBoard scalars when tensorboard
is importable, and PNG curves at the end when matplotlib is.

Files, beside the checkpoints: ``{label}.config.yaml``, ``{label}.csv``, ``{label}.jsonl``, ``{label}.png``,
``tb/{label}/`` (TensorBoard). Epochs are counted from 1 in all of them, as on the console.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


# Columns of the per-epoch CSV; an epoch without validation (train.eval_every > 1) or without EMA leaves
# those cells empty. epoch: counted from 1; train_res: the epoch's training resolution (px); lr: the
# learning rate of the epoch's last step.
EPOCH_FIELDS = ("epoch", "train_res", "lr", "train_loss", "train_top1", "img_s", "epoch_time_s", "val_loss",
                "val_top1", "val_top5", "val_images", "ema_val_top1")


def format_duration(seconds: float) -> str:
    """``0:04:10``, ``2 days, 3:00:00``: datetime.timedelta's form, to the second."""
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


def run_metadata(argv: list[str]) -> dict:
    """Code version, command and library versions: every result records what produced it."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return p.stdout.strip() if p.returncode == 0 else ""   # not a git checkout (e.g. a copied tree)

    versions = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for module, dist_prefix in (("torchvision", "torchvision"), ("nvidia.dali", "nvidia-dali-cuda")):
        if module in sys.modules:
            versions[module] = str(sys.modules[module].__version__)
        else:   # from the package metadata: importing DALI only to read its version takes seconds
            found = [d.version for d in importlib.metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith(dist_prefix)]
            versions.update({module: found[0]} if found else {})
    commit = git("rev-parse", "HEAD")
    # a copied tree has no .git: the commit it was copied from comes in FDM_GIT_COMMIT (run_gpu.sh --commit)
    return {"git_commit": commit or os.environ.get("FDM_GIT_COMMIT") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "command": shlex.join([sys.executable, *argv]), "host": platform.node(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"}


def format_resolutions(data, epochs: int) -> str:
    """The training resolution of each epoch, e.g. ``160 px (epochs 1-25), 192 px (epochs 26-32)``, and the
    evaluation's: for the header."""
    spans: list[list[int]] = []           # [size, first epoch, last epoch], epochs counted from 1
    for epoch in range(epochs):
        size = data.train_size(epoch)
        if spans and spans[-1][0] == size:
            spans[-1][2] = epoch + 1
        else:
            spans.append([size, epoch + 1, epoch + 1])
    train = ", ".join(f"{size} px" if len(spans) == 1 else
                      f"{size} px (epoch {first})" if first == last else f"{size} px (epochs {first}-{last})"
                      for size, first, last in spans)
    return f"train {train}, val {data.val_crop} px (resize {data.val_resize})"


def format_metrics(m: dict) -> str:
    """The evaluation result as one line."""
    return (f"top-1 {m['val_top1']:.2f}%  top-5 {m['val_top5']:.2f}%  loss {m['val_loss']:.4f}  "
            f"({m['val_images']} images)")


class RunLogger:
    """Rank 0 writes; on other ranks every method is a no-op, so call sites need no rank checks."""

    def __init__(self, output_dir: str, label: str, enabled: bool, start_epoch: int = 0):
        """``start_epoch``: the epochs completed before this run (a resumed run); their summaries are kept,
        later ones dropped (they are about to be run again)."""
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.label = label
        self.tty = sys.stdout.isatty()
        self.history: list[dict] = []
        self.tb = None
        self._first_step: tuple[float, int] | None = None   # (time, global step) of this run's first step line
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = self.dir / f"{label}.csv", self.dir / f"{label}.jsonl"
        kept = []
        if start_epoch > 0 and self.jsonl_path.is_file():
            kept = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line]
            kept = [h for h in kept if h["epoch"] <= start_epoch]
        self.csv_path.unlink(missing_ok=True)
        self.jsonl_path.unlink(missing_ok=True)
        for summary in kept:
            self._append(summary)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tb" / label))
        except ImportError:   # tensorboard is optional
            pass

    def print(self, message: str) -> None:
        if self.enabled:
            if self.tty:
                sys.stdout.write("\r\033[K")   # clear a progress bar drawn on this line
            print(message, flush=True)

    def write_config(self, config: dict, metadata: dict) -> Path | None:
        if not self.enabled:
            return None
        path = self.dir / f"{self.label}.config.yaml"
        path.write_text(yaml.safe_dump({"run": metadata, **config}, sort_keys=False))
        return path

    def step(self, m: dict) -> None:
        """One print point (fdmobilenet.loop.Loop.step_boundary's metrics ``m``): a line in a log file, or an in-place
        progress bar on a terminal. Loss and top-1 are the window's since the last print point, with the
        epoch's running average in brackets (rank 0's, as timm prints them); img/s counts all ranks."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first_step is None:
            self._first_step = (now - m["step_time"], m["global_step"] - 1)
        t0, g0 = self._first_step
        eta = m["steps_left"] * (now - t0) / max(1, m["global_step"] - g0)
        mem = f"  max mem {m['max_mem_gib']:.2f} GiB" if m.get("max_mem_gib") is not None else ""
        line = (f"loss {m['loss']:.4f} ({m['loss_avg']:.4f})  top1 {m['top1']:5.1f}% ({m['top1_avg']:5.1f}%)  "
                f"lr {m['lr']:.5f}  {m['img_s']:,.0f} img/s  data wait {100 * m['data_wait']:3.0f}%{mem}  "
                f"ETA {format_duration(eta)}")
        where = f"epoch {m['epoch']}/{m['epochs']}"
        if self.tty:   # the bar of a finished epoch stays, on its own line
            done = int(30 * m["step"] / m["steps"])
            sys.stdout.write(f"\r\033[K{where} [{'#' * done}{'.' * (30 - done)}] {m['step']}/{m['steps']}  {line}"
                             + ("\n" if m["step"] == m["steps"] else ""))
            sys.stdout.flush()
        else:
            print(f"{where} step {m['step']}/{m['steps']}  {line}", flush=True)
        if self.tb is not None:
            for key in ("loss", "top1", "lr", "img_s", "data_wait"):
                self.tb.add_scalar(f"train_step/{key}", m[key], m["global_step"])

    def epoch(self, summary: dict) -> None:
        """Append the epoch's summary to the CSV and JSON-lines files (and TensorBoard)."""
        if not self.enabled:
            return
        self._append(summary)
        if self.tb is not None:
            for key, value in summary.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"epoch/{key}", value, summary["epoch"])
        self.print(f"epoch {summary['epoch']} done:  " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items() if k != "epoch"))

    def _append(self, summary: dict) -> None:
        self.history.append(summary)
        new = not self.csv_path.is_file()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_FIELDS, restval="")
            if new:
                writer.writeheader()
            writer.writerow(summary)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(summary) + "\n")

    def close(self, plot: bool, best_epoch: int = 0) -> Path | None:
        """Flush TensorBoard; draw the curves (:func:`plot_history`, needs matplotlib, skipped without it)."""
        if not self.enabled:
            return None
        if self.tb is not None:
            self.tb.close()
        if not plot or not self.history:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig = plot_history(self.history, self.label, best_epoch)
        path = self.dir / f"{self.label}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def plot_history(history: list[dict], title: str, best_epoch: int = 0):
    """Loss, accuracy and lr per epoch (a matplotlib Figure): whole-epoch ticks, the best epoch (by val top-1)
    marked by a dashed line in each panel."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, name in ((axes[0], ("train_loss", "val_loss"), "loss"),
                           (axes[1], ("train_top1", "val_top1", "val_top5"), "accuracy (%)"),
                           (axes[2], ("lr",), "learning rate")):
        for key in keys:
            points = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best: epoch {best_epoch}")
        ax.set_title(name)
        if name == "loss":
            ax.set_yscale("log")   # early val-loss spikes (BN statistics catching up) would flatten the rest
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig

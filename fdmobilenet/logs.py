"""What a run leaves behind, written by rank 0 only: console lines (a progress bar on a terminal), the resolved
config with the code version, per-epoch CSV and JSON-lines summaries, TensorBoard scalars when tensorboard
is importable, and PNG curves at the end when matplotlib is.

Files, beside the checkpoints: ``{label}.config.yaml``, ``{label}.csv``, ``{label}.jsonl``, ``{label}.png``,
``tb/{label}/`` (TensorBoard).
"""
from __future__ import annotations

import csv
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
# those cells empty.
EPOCH_FIELDS = ("epoch", "lr", "train_loss", "train_top1", "img_s", "epoch_time_s", "val_loss", "val_top1",
                "val_top5", "val_images", "ema_val_top1")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


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
    for name in ("torchvision", "nvidia.dali"):
        try:
            versions[name] = str(__import__(name, fromlist=["__version__"]).__version__)
        except ImportError:
            pass
    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "command": shlex.join([sys.executable, *argv]), "host": platform.node(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"}


def format_metrics(m: dict) -> str:
    """The evaluation result as one line."""
    return (f"top-1 {m['val_top1']:.2f}%  top-5 {m['val_top5']:.2f}%  loss {m['val_loss']:.4f}  "
            f"({m['val_images']} images)")


class RunLogger:
    """Rank 0 writes; on other ranks every method is a no-op, so call sites need no rank checks."""

    def __init__(self, output_dir: str, label: str, enabled: bool, start_epoch: int = 0):
        """``start_epoch``: summaries of earlier epochs are kept (a resumed run), later ones dropped (they
        are about to be run again)."""
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.label = label
        self.tty = sys.stdout.isatty()
        self.history: list[dict] = []
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = self.dir / f"{label}.csv", self.dir / f"{label}.jsonl"
        kept = []
        if start_epoch > 0 and self.jsonl_path.is_file():
            kept = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line]
            kept = [h for h in kept if h["epoch"] < start_epoch]
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

    def step(self, m: dict, epochs: int, eta_seconds: float) -> None:
        """One print point: a line in a log file, or an in-place progress bar on a terminal."""
        if not self.enabled:
            return
        line = (f"loss {m['loss']:.4f}  top1 {m['top1']:5.1f}%  lr {m['lr']:.5f}  {m['img_s']:,.0f} img/s  "
                f"data wait {100 * m['data_wait']:3.0f}%  ETA {_fmt_duration(eta_seconds)}")
        where = f"epoch {m['epoch'] + 1}/{epochs}"
        if self.tty:
            done = int(30 * m["step"] / m["steps"])
            sys.stdout.write(f"\r\033[K{where} [{'#' * done}{'.' * (30 - done)}] {m['step']}/{m['steps']}  {line}")
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
        # Console counts epochs from 1, as the step lines do; the CSV/JSON keep the 0-based index the
        # checkpoint and the LR schedule use.
        self.print(f"epoch {summary['epoch'] + 1} done:  " + "  ".join(
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

    def close(self, plot: bool) -> Path | None:
        """Flush TensorBoard; draw loss / top-1 / lr per epoch (needs matplotlib, skipped without it)."""
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
        epochs = [h["epoch"] for h in self.history]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, keys, title in ((axes[0], ("train_loss", "val_loss"), "loss"),
                                (axes[1], ("train_top1", "val_top1", "val_top5"), "accuracy (%)"),
                                (axes[2], ("lr",), "learning rate")):
            for key in keys:
                points = [(e, h[key]) for e, h in zip(epochs, self.history) if h.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", label=key)
            ax.set_title(title)
            if title == "loss":
                ax.set_yscale("log")   # early val-loss spikes (BN statistics catching up) would flatten the rest
            ax.set_xlabel("epoch")
            ax.legend()
        fig.suptitle(self.label)
        fig.tight_layout()
        path = self.dir / f"{self.label}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

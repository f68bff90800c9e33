"""The benchmark scripts run end to end: run_gpu.sh --cpu does every step of the GPU measurement at toy size
(pytest -m gpu, real photo JPEGs, real DALI CPU pipeline and DataLoader, torch.compile, torch.profiler,
train_ddp.py under torchrun stopped by its preemption signal, torchrun with 1 and 2 gloo ranks, the chart)
and leaves every section in results.json / results.md. No throughput number is asserted: only that each
step ran and produced finite, positive, complete results. The GPU plan's time budgets are checked to add up
to its 8 minutes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import collect_results  # noqa: E402
import common  # noqa: E402

pytestmark = pytest.mark.slow


def run_script(out: Path, work: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, "BENCH_WORK": str(work), **env})


STEPS = ["gpu_tests", "dataset", "flops", "ceilings", "pipeline", "end_to_end", "profile", "ddp"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    proc = run_script(out, work, timeout=900)
    return proc, out


def plan(*flags: str) -> tuple[dict[str, int], int]:
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "--plan", *flags], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    budgets = dict((name, int(b)) for name, b in (line.split(":") for line in out))
    return budgets, budgets.pop("total")


def test_gpu_plan_budgets_add_up_to_eight_minutes():
    """Every step of the GPU run has a budget, the budgets sum to the time box, and the box is the 8 minutes
    the GPU host's device time leaves after DALI's uploads; the last write-up has its own reserve."""
    budgets, total = plan()
    assert list(budgets) == STEPS + ["gpu_demo", "write_up"]   # the compiled digits demo test last
    assert sum(budgets.values()) == total == 480
    assert all(b > 0 for b in budgets.values())
    cpu_budgets, cpu_total = plan("--cpu")
    assert list(cpu_budgets) == STEPS + ["ddp_gloo_1", "ddp_gloo_2", "write_up"]
    assert sum(cpu_budgets.values()) == cpu_total


def test_cpu_run_every_step_passes(cpu_run):
    proc, out = cpu_run
    res = json.loads((out / "results.json").read_text())
    failed = [s for s in res["steps"] if s["status"] != "ok"]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], (out / "log.txt").read_text()[-6000:])
    assert [s["name"] for s in res["steps"]] == STEPS + ["ddp_gloo_1", "ddp_gloo_2"]
    # at most 8 files come back from the GPU machine; the script writes 6
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md", "throughput.png",
                                                      "trace_ceiling.json.gz", "trace_e2e_dali.json.gz"]
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["chart"] == "throughput.png"


def test_cpu_run_sections_complete(cpu_run):
    _, out = cpu_run
    res = json.loads((out / "results.json").read_text())
    for section in collect_results.SECTIONS:
        assert res[section]["status"] == "ok", section
    assert res["meta"]["git_commit"] and res["meta"]["command"] and res["meta"]["versions"]["torch"]
    assert res["dataset"]["params"]["num_train"] == 64
    assert all(row["ok"] for row in res["flops"]["rows"])

    ceilings = res["ceilings"]["result"]
    assert not ceilings["errors"]
    assert [r["variant"] for r in ceilings["rows"]] == ["eager_fp32_nchw", "channels_last", "channels_last_bf16",
                                                         "compiled"]
    for r in ceilings["rows"]:
        assert r["img_s"] > 0 and math.isfinite(r["loss"]) and len(r["windows_img_s"]) == 3
        assert r["peak_mem_mib"] == "n/a" and r["mfu_pct"] == "n/a"   # CPU: no device memory, no bf16 peak

    e2e = res["end_to_end"]["result"]
    assert not e2e["errors"]
    assert [r["data"] for r in e2e["rows"]] == ["torchvision", "dali"]
    for r in e2e["rows"]:
        assert r["img_s"] > 0 and r["ceiling_img_s"] > 0 and 0 <= r["data_wait_pct"] <= 100
        assert r["e2e_vs_ceiling"] == pytest.approx(r["img_s"] / r["ceiling_img_s"], rel=0.01)
        assert r["act_tb_s"] >= 0 and r["act_mb_img"] > 0      # the traffic model's bytes x img/s
        assert isinstance(r["loader_threads"], int) and isinstance(r["prefetch"], int)   # 'auto' resolved

    loaders = {r["loader"] for r in res["pipeline"]["result"]["results"]}
    assert loaders == {"torchvision", "dali"}
    runs = {r["name"]: r for r in res["profile"]["runs"]}
    assert set(runs) == {"ceiling", "e2e_dali"} and runs["e2e_dali"]["data"].startswith("DALI")
    for r in runs.values():
        assert len(r["rows"]) == 15 and all(row["us_per_step"] > 0 for row in r["rows"])
        assert r["table_of"] == "CPU operators" and r["trace"].startswith(f"trace_{r['name']}.json.gz")
    ddp = res["ddp"]["result"]
    assert ddp["exit_code"] == 0 and ddp["stop_requested_at_step"] == 2
    assert ddp["preempted"].startswith("preempted (SIGUSR1) at epoch ")   # stopped, not evaluated
    assert ddp["median_img_s"] > 0 and len(ddp["windows"]) >= 3
    # train_ddp.py counts epochs from 1: the step lines' epoch/step give global steps 1, 2, 3, ...
    assert [w["global_step"] for w in ddp["windows"]] == list(range(1, len(ddp["windows"]) + 1)), ddp["windows"]
    ovh = res["ddp_overhead"]
    assert [r["world_size"] for r in ovh["rows"]] == [1, 2] and ovh["overhead_pct"] is not None
    assert ovh["rows"][1]["allreduce_ms"] > 0   # one gloo all-reduce of all gradients, timed

    md = (out / "results.md").read_text()
    for heading in ("## Steps", "## GPU tests", "## Dataset", "## FLOPs check", "## Model-only ceilings",
                    "## End to end", "## Data pipeline alone", "## Profile", "## torchrun + train_ddp.py",
                    "## DDP overhead"):
        assert heading in md
    gpu_tests = res["gpu_tests"]
    assert gpu_tests["tests"] and all(t["outcome"] == "SKIPPED" for t in gpu_tests["tests"])   # no CUDA here
    assert len(gpu_tests["summary"]) == 1 and "skipped" in gpu_tests["summary"][0]
    assert any("digits_demo" in t["test"] for t in gpu_tests["tests"])   # on a GPU: the gpu_demo step's


def test_record_run_keeps_other_sections(cpu_run, tmp_path):
    _, out = cpu_run
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Pipeline throughput (CPU)\n\nkept\n")
    collect_results.record_run(out / "results.md", results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## Pipeline throughput (CPU)\n\nkept\n")
    assert "## run_gpu.sh (CPU)" in text and "### Model-only ceilings" in text
    assert text.count("\n## ") == 2   # the run's own headings were demoted into its section


def test_time_box_records_timeouts_and_skips(tmp_path):
    """Steps cut by the total budget are recorded as timed out (killed at the budget's end) or skipped (too
    little left to start), and the results are still written with every section: what the GPU run relies on
    when it runs out of time. Which step is cut first, and how, depends on the machine's speed and load, so
    any cut point is accepted (at 25 s some step always is: the toy run is several times longer), as long as
    the steps before it ran and every step after it was cut."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_script(out, work, timeout=180, BENCH_TOTAL_S="25")
    assert proc.returncode == 1
    res = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert list(status) == STEPS + ["ddp_gloo_1", "ddp_gloo_2"]
    cut = [name for name, st in status.items() if st != "ok"]
    assert cut and all(status[name] in ("timeout", "skipped") for name in cut), status
    assert list(status)[-len(cut):] == cut, status   # once cut, every later step is cut too
    assert max(s["started_at_s"] + s["seconds"] for s in res["steps"]) <= 25 + 12   # + timeout's kill grace
    assert set(collect_results.SECTIONS) <= set(res)
    md = (out / "results.md").read_text()
    assert all(f"| {name} | {st} |" in md for name, st in status.items()), md   # the steps table says which


def test_commit_comes_from_the_command_line_where_there_is_no_git(tmp_path):
    """The GPU host gets a copy of the tree without .git: run_gpu.sh --commit SHA passes the commit on
    (FDM_GIT_COMMIT), and every result records it."""
    shutil.copytree(REPO / "fdmobilenet", tmp_path / "fdmobilenet")
    code = "from fdmobilenet.logs import run_metadata; m = run_metadata([]); print(m['git_commit'], m['git_dirty'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path), "FDM_GIT_COMMIT": "0123abc"}).stdout
    assert out.split() == ["0123abc", "None"]


def test_record_edits_only_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.record("A", "one", path)
    assert path.read_text().startswith("# Benchmark results")
    other = "\n## B\n\nkept as is\n  with odd spacing  \n"
    path.write_text(path.read_text() + other)
    common.record("A", "two", path)
    common.record("C", "three", path)
    text = path.read_text()
    assert text.index("one") < text.index("two") < text.index("## B") < text.index("## C") < text.index("three")
    assert other.strip("\n") in text


def test_interleave_runs_variants_in_rounds():
    calls = []
    out = common.interleave({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b"] * 3 and out == {"a": [1, 1, 1], "b": [2, 2, 2]}


def test_startup_scan_benchmark_runs_every_variant(tmp_path):
    """benchmarks/startup_scan.py end to end at toy size (real photo JPEGs, real torchrun + gloo for the 2-rank
    variants, the real verify command for the manifest): every variant reports a time, and the files each rank
    read show the scan split in two and the manifest replacing it. No speed is asserted."""
    out = tmp_path / "scan.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "startup_scan.py"), "--files", "400", "--rounds", "1",
                        "--verify-files", "50", "--cost-files", "50", "--work", str(tmp_path / "work"),
                        "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert {name: rows[name]["checked"] for name in ("scan, 1 rank", "scan, 2 ranks", "manifest, 1 rank",
                                                     "manifest, 2 ranks")} == \
        {"scan, 1 rank": "400", "scan, 2 ranks": "200 + 200", "manifest, 1 rank": "0", "manifest, 2 ranks": "0 + 0"}
    assert len(rows) == 8 and all(r["s"] > 0 and len(r["rounds"]) == 1 for r in rows.values())
    assert [c["check"].split(" ")[0] for c in report["per_file"]] == ["listing", "os.stat", "pre-flight", "PIL", "full"]
    assert {"versions", "git_commit", "command", "cores", "load_avg_1_5_15"} <= set(report["meta"])


def test_fill_wraps_prose_and_keeps_commands_and_tables_whole():
    long = "word " * 60
    text = common.fill(f"{long}\n\n`python x.py {'--flag ' * 40}`\n\n| a | b |\n| --- | --- |\n| {'c' * 150} | d |")
    prose, command, table = text.split("\n\n")
    assert max(len(line) for line in prose.splitlines()) <= 118 and prose.split() == long.split()
    assert command.count("\n") == 0 and table.count("\n") == 2


def test_resolution_change_benchmark_times_a_rebuild(photo_root):
    """benchmarks/resolution_change.py at toy size (11 photo JPEGs, 32 -> 64 px): the three variants run and
    the rebuilt loader's next epoch comes at the new size. No speed is asserted."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "resolution_change.py"), "--data", str(photo_root),
                        "--from-size", "32", "--to-size", "64", "--batch", "2", "--threads", "1", "--rounds", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for row in ("| 32 -> 32 |", "| 64 -> 64 |", "| 32 -> 64 (rebuild) |"):
        assert row in p.stdout, p.stdout

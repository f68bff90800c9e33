"""The benchmark scripts run end to end: run_gpu.sh --cpu does every step of the GPU measurement at toy size
(real photo JPEGs, real DALI CPU pipeline and DataLoader, torch.compile, torchrun with 1 and 2 gloo ranks)
and leaves every section in results.json / results.md. No throughput number is asserted: only that each
step ran and produced finite, positive, complete results.
"""
from __future__ import annotations

import json
import math
import os
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


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    proc = run_script(out, work, timeout=420)
    return proc, out


def test_cpu_run_every_step_passes(cpu_run):
    proc, out = cpu_run
    res = json.loads((out / "results.json").read_text())
    failed = [s for s in res["steps"] if s["status"] != "ok"]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], (out / "log.txt").read_text()[-6000:])
    assert [s["name"] for s in res["steps"]] == ["dataset", "flops", "ceilings", "end_to_end", "pipeline", "ddp",
                                                 "ddp_gloo_1", "ddp_gloo_2"]
    # at most 6 files come back from the GPU machine; the script writes 3
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md"]


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
        assert r["img_s"] > 0 and r["ceiling_img_s"] > 0
        assert r["e2e_vs_ceiling"] == pytest.approx(r["img_s"] / r["ceiling_img_s"], rel=0.01)

    loaders = {r["loader"] for r in res["pipeline"]["result"]["results"]}
    assert loaders == {"torchvision", "dali"}
    assert [e["epoch"] for e in res["ddp"]["epochs"]] == [1, 2]   # train_ddp.py counts epochs from 1
    ovh = res["ddp_overhead"]
    assert [r["world_size"] for r in ovh["rows"]] == [1, 2] and ovh["overhead_pct"] is not None
    assert ovh["rows"][1]["allreduce_ms"] > 0   # one gloo all-reduce of all gradients, timed

    md = (out / "results.md").read_text()
    for heading in ("## Steps", "## Dataset", "## FLOPs check", "## Model-only ceilings", "## End to end",
                    "## Data pipeline alone", "## torchrun + train_ddp.py", "## DDP overhead"):
        assert heading in md


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
    any is accepted (at 16 s some step always is: the toy run is several times longer)."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_script(out, work, timeout=120, BENCH_TOTAL_S="16")
    assert proc.returncode == 1
    res = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert list(status) == ["dataset", "flops", "ceilings", "end_to_end", "pipeline", "ddp", "ddp_gloo_1",
                            "ddp_gloo_2"]
    cut = [name for name, st in status.items() if st != "ok"]
    assert cut and all(status[name] in ("timeout", "skipped") for name in cut), status
    assert list(status)[-len(cut):] == cut, status   # once cut, every later step is cut too
    assert max(s["started_at_s"] + s["seconds"] for s in res["steps"]) <= 16 + 12   # + timeout's kill grace
    assert set(collect_results.SECTIONS) <= set(res)
    md = (out / "results.md").read_text()
    assert all(f"| {name} | {st} |" in md for name, st in status.items()), md   # the steps table says which


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

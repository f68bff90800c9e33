"""The benchmark scripts run end to end: run_gpu.sh --cpu does every step of the GPU measurement at toy size
(the hardware-decoder probe as a "no GPU" row, real photo JPEGs and their manifests, real DALI CPU pipeline and
DataLoader, torch.compile, torch.profiler, train_ddp.py under torchrun stopped by its preemption signal, pytest
-m gpu, torchrun with 1 and 2 gloo ranks, the chart) and leaves every section in results.json / results.md,
row by row as they are measured: a box killed mid-step keeps what it measured. No throughput number is
asserted: only that each step ran and produced finite, positive, complete results. The GPU plan is checked
to fit its box of 300 s with the headline rows first.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import collect_results  # noqa: E402
import common  # noqa: E402

pytestmark = pytest.mark.slow
SCRIPT = REPO / "benchmarks" / "run_gpu.sh"
HEADLINE = ["hw_decoder", "dataset", "end_to_end", "ceilings"]
REST = ["stored_size", "dali_sweep", "batch_512", "variants", "profile", "ddp", "gpu_tests"]
# the CPU box: the eager variants run in the ceilings step; no batch 512; gloo DDP instead of the demo
CPU_STEPS = HEADLINE + ["stored_size", "dali_sweep", "profile", "ddp", "gpu_tests", "ddp_gloo_1", "ddp_gloo_2"]


def start_script(out: Path, work: Path, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), "--cpu", "--out", str(out), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHON": sys.executable, "BENCH_WORK": str(work), **env})


def results(out: Path) -> dict | None:
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None


def e2e_rows(res: dict | None) -> list[dict]:
    return ((res or {}).get("end_to_end", {}).get("result") or {}).get("rows", [])


def finished(res: dict | None) -> list[str]:
    return [s["name"] for s in (res or {}).get("steps", [])]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The whole --cpu box, with what results.json held at every moment it was read (every 0.3 s); its work
    folder (the photo set and its manifests) serves the killed box below."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    proc = start_script(out, work)
    seen = []
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        res = results(out)
        seen.append({"finished": finished(res), "e2e_rows": len(e2e_rows(res))})
        time.sleep(0.3)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    stdout = proc.communicate()[0]
    return proc, stdout, out, seen, work


def plan(*flags: str) -> tuple[list[tuple[str, int]], int, str]:
    text = subprocess.run(["bash", str(SCRIPT), "--plan", *flags], capture_output=True, text=True, timeout=30,
                          check=True).stdout
    rows = [line.split()[:3] for line in text.splitlines() if len(line.split()) >= 3]
    steps = [(name, int(budget)) for name, budget, by in rows if budget.isdigit() and by.isdigit()]
    total = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("total "))
    return steps, total, text


def test_gpu_plan_is_a_box_of_300_s_with_the_headline_first():
    """The GPU box: at most 300 s; its budgets add up to it; the first step that measures anything is end to
    end, after only the probe and the photo set; the headline (end to end and the ceilings) is reserved
    within the first ~3 minutes; the pre-resized rows (stored size x resolution) come right after it; then the
    rest in the issue's order, the tests last."""
    steps, total, text = plan()
    names = [name for name, _ in steps]
    assert total <= 300 and sum(b for _, b in steps) == total and all(b > 0 for _, b in steps)
    assert names == HEADLINE + REST + ["gpu_demo", "write_up"]
    budgets = dict(steps)
    assert sum(budgets[n] for n in HEADLINE) <= 180
    assert "original,256,160" in next(ln for ln in text.splitlines() if ln.startswith("stored_size "))
    cpu_steps, cpu_total, _ = plan("--cpu")
    assert [name for name, _ in cpu_steps] == CPU_STEPS + ["write_up"]
    assert sum(b for _, b in cpu_steps) == cpu_total


def test_plan_of_a_rerun_box():
    """--from repeats a step and runs every later one, with the photo set when they read it; --only runs the
    steps named; an unknown step is refused with the list."""
    steps, total, text = plan("--from", "variants")
    assert [n for n, _ in steps] == ["dataset", "variants", "profile", "ddp", "gpu_tests", "gpu_demo", "write_up"]
    assert total == 300 and "may also use the" in text
    steps, _, _ = plan("--only", "ceilings,batch_512")
    assert [n for n, _ in steps] == ["ceilings", "batch_512", "write_up"]
    bad = subprocess.run(["bash", str(SCRIPT), "--plan", "--only", "end2end"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "no step 'end2end'" in bad.stderr and "end_to_end" in bad.stderr


def test_cpu_run_every_step_passes(cpu_run):
    proc, stdout, out, _, _ = cpu_run
    res = json.loads((out / "results.json").read_text())
    failed = [s for s in res["steps"] if s["status"] != "ok"]
    assert not failed and proc.returncode == 0, (failed, stdout[-3000:], (out / "log.txt").read_text()[-6000:])
    assert [s["name"] for s in res["steps"]] == CPU_STEPS and res["rerun_from"] is None
    # at most 8 files come back from the GPU machine; the script writes 7
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md", "stored_size.png",
                                                      "throughput.png", "trace_ceiling.json.gz",
                                                      "trace_e2e_dali.json.gz"]
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["chart"] == "throughput.png"


def test_cpu_run_rows_appear_while_their_step_runs(cpu_run):
    """results.json held an end-to-end row before the end-to-end step had finished: rows are collected as they
    are measured, not when their step (or the box) ends."""
    seen = cpu_run[3]
    during = [s for s in seen if s["e2e_rows"] and "end_to_end" not in s["finished"]]
    assert during, [s for s in seen if "dataset" in s["finished"]][:40]
    assert "dataset" in during[0]["finished"] and "ceilings" not in during[0]["finished"]


def test_cpu_run_sections_complete(cpu_run):
    out = cpu_run[2]
    res = json.loads((out / "results.json").read_text())
    for section in ("hw_decoder", "dataset", "end_to_end", "stored_size", "dali_sweep", "profile", "ddp",
                    "gpu_tests", "ddp_overhead"):
        assert res[section]["status"] == "ok", section
    assert {name: s["status"] for name, s in res["model_only"]["steps"].items()} == {
        "ceilings": "ok", "batch_512": "not in this box", "variants": "not in this box"}
    assert res["meta"]["git_commit"] and res["meta"]["command"] and res["meta"]["versions"]["torch"]

    hw = res["hw_decoder"]["result"]   # no driver here: a clean row that says so
    assert hw["gpu"] is None and hw["status"].startswith("no GPU") and not hw["missing"]
    ds = res["dataset"]
    assert ds["params"]["num_train"] == 64 and ds["manifests"] == ["train", "val"]
    assert ds["scans_after_dataset"] == []   # every later loader used the manifests, none read the photos

    e2e = res["end_to_end"]["result"]
    assert not e2e["errors"]
    assert [r["data"] for r in e2e["rows"]] == ["torchvision", "dali"]
    for r in e2e["rows"]:
        assert r["img_s"] > 0 and r["ceiling_img_s"] > 0 and 0 <= r["data_wait_pct"] <= 100
        assert r["e2e_vs_ceiling"] == pytest.approx(r["img_s"] / r["ceiling_img_s"], rel=0.01)
        assert r["act_tb_s"] >= 0 and r["act_mb_img"] > 0      # the traffic model's bytes x img/s
        assert isinstance(r["loader_threads"], int) and isinstance(r["prefetch"], int)   # 'auto' resolved
    assert e2e["rows"][1]["jpeg_engines"] == "n/a (no GPU)"
    (head,) = res["headline"]["rows"]
    assert head["width"] == 0.25 and head["dali_vs_dataloader"] == pytest.approx(
        e2e["rows"][1]["img_s"] / e2e["rows"][0]["img_s"], rel=0.01)
    assert head["ceiling_cuda_graphs"] == "not measured"   # a GPU variant

    model = collect_results.model_only_rows(res)
    assert [(r["step"], r["variant"]) for r in model] == [
        ("ceilings", "eager_fp32_nchw"), ("ceilings", "channels_last"), ("ceilings", "channels_last_bf16"),
        ("ceilings", "compiled")]
    for r in model:
        assert r["img_s"] > 0 and math.isfinite(r["loss"]) and len(r["windows_img_s"]) == 3
        assert r["peak_mem_mib"] == "n/a" and r["mfu_pct"] == "n/a"   # CPU: no device memory, no bf16 peak
    assert model[-1]["graphs"] == 1 and model[-1]["graphs_in_windows"] == 0   # one static graph, none timed
    check = res["compile_check"]
    assert check["status"].startswith("ok") and not check["limit_hits"]
    settings = check["settings"]["ceilings"]
    assert settings["recompile_limit"] == 64 and settings["limit_hit_is_an_error"]
    assert settings["inductor_cache_dir"].endswith("inductor-cache")

    sizes = res["stored_size"]["result"]   # the pre-resized rows: both loaders, the photos and their copy
    assert [(r["loader"], r["stored"], r["res"]) for r in sizes["pipeline"]] == [
        (loader, stored, 128) for loader in ("torchvision", "dali") for stored in ("original (375)", "160")]
    assert all(r["img_s"] > 0 for r in sizes["pipeline"]) and sizes["bytes"]["160"] < sizes["bytes"]["original (375)"]
    sweep = res["dali_sweep"]["result"]
    assert {r["loader"] for r in sweep["results"]} == {"torchvision", "dali"} and sweep["rounds_done"] == 3
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
    for heading in ("## Headline", "## Steps", "## Hardware JPEG decoder", "## Dataset", "## End to end",
                    "## Model-only ceilings", "## Pre-resized copies", "## Data pipeline alone", "## Compile check", "## Profile",
                    "## torchrun + train_ddp.py", "## GPU tests", "## DDP overhead"):
        assert heading in md
    assert md.index("## Headline") < md.index("## Steps") < md.index("## End to end")
    gpu_tests = res["gpu_tests"]
    assert gpu_tests["tests"] and all(t["outcome"] == "SKIPPED" for t in gpu_tests["tests"])   # no CUDA here
    assert len(gpu_tests["summary"]) == 1 and "skipped" in gpu_tests["summary"][0]
    assert any("digits_demo" in t["test"] for t in gpu_tests["tests"])   # on a GPU: the gpu_demo step's
    assert any("hardware_jpeg_decoder" in t["test"] for t in gpu_tests["tests"])


def test_a_killed_box_keeps_the_rows_measured_so_far(cpu_run, tmp_path):
    """The box killed (SIGKILL, the whole process group: what the GPU host's time limit does) in the middle of
    the end-to-end step, as soon as its first row shows in results.json: results.json and results.md still hold
    that row and the steps before, say the step did not finish, and name it as where a rerun starts. (A rerun
    box: --only end_to_end, on the full box's photo set.)"""
    out = tmp_path / "out"
    proc = start_script(out, cpu_run[4], "--only", "end_to_end")
    deadline = time.monotonic() + 300
    res = None
    while time.monotonic() < deadline and proc.poll() is None:
        res = results(out)
        if e2e_rows(res) and "end_to_end" not in finished(res):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = results(out)
    assert finished(kept) == ["dataset"] and kept["end_to_end"]["status"] == "not finished"
    assert e2e_rows(kept) == e2e_rows(res) and kept["rerun_from"] == "end_to_end"
    row = e2e_rows(kept)[0]
    md = (out / "results.md").read_text()
    assert f"| {row['img_s']} |" in md and "Rerun from: `--from end_to_end`" in md


def test_time_box_records_timeouts_and_skips(tmp_path):
    """Steps cut by the total budget are recorded as timed out (killed at the budget's end) or skipped (too
    little left to start), and the results are still written with every section: what the GPU run relies on
    when it runs out of time. In a box of 8 s the ceilings step (torch's import and an aot_eager compile) is
    always cut; how the next one is cut depends on the machine's speed, so either way is accepted."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = start_script(out, work, "--only", "ddp_gloo_1,ceilings", BENCH_TOTAL_S="8")
    stdout = proc.communicate(timeout=180)[0]
    assert proc.returncode == 1, stdout[-3000:]
    res = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert list(status) == ["ceilings", "ddp_gloo_1"]   # plan order, not --only's
    assert status["ceilings"] == "timeout" and status["ddp_gloo_1"] in ("timeout", "skipped"), status
    assert max(s["started_at_s"] + s["seconds"] for s in res["steps"]) <= 8 + 12   # + timeout's kill grace
    assert set(collect_results.SECTIONS) <= set(res) and res["rerun_from"] == "ceilings"
    assert res["hw_decoder"]["status"] == "not in this box"
    md = (out / "results.md").read_text()
    assert all(f"| {name} | {st} |" in md for name, st in status.items()), md   # the steps table says which
    assert "rerun: --from ceilings" in stdout


def test_record_run_keeps_other_sections(cpu_run, tmp_path):
    out = cpu_run[2]
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Pipeline throughput (CPU)\n\nkept\n")
    collect_results.record_run(out / "results.md", results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## Pipeline throughput (CPU)\n\nkept\n")
    assert "## run_gpu.sh (CPU)" in text and "### Model-only ceilings" in text
    assert text.count("\n## ") == 2   # the run's own headings were demoted into its section


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


def test_stored_size_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/stored_size.py --quick --stages end to end (a photo set and its copy by pipelines.resize, both
    loaders alone and through train_ddp.py under torchrun, DALI's graph cut after each op): every row measured,
    finite and positive, the bytes per image and the chart written. No speed is asserted."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stored_size.py"), "--quick", "--stages", "--out",
                           str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "stored_size.json").read_text())
    variants = [(loader, stored, 128) for loader in ("torchvision", "dali") for stored in ("original (375)", "160")]
    for section in ("pipeline", "end_to_end"):
        assert [(r["loader"], r["stored"], r["res"]) for r in res[section]] == variants, section
        assert all(math.isfinite(x) and x > 0 for r in res[section] for x in r["rounds"]), section
    assert len(res["pipeline"][0]["rounds"]) == 3 and len(res["end_to_end"][0]["rounds"]) == 1
    assert res["bytes"]["160"] < res["bytes"]["original (375)"]
    assert [(r["stored"], r["stage"]) for r in res["stages"]] == [
        (stored, stage) for stored in ("original (375)", "160") for stage in ("ROI decode", "+ resize", "+ normalise")]
    assert all(r["ms_per_img"] > 0 and len(r["rounds"]) == 3 for r in res["stages"])
    assert (out / "stored_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dali | 160 | 128 |" in (out / "stored_size.md").read_text()
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

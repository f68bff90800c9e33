"""Merge the step outputs of run_gpu.sh into OUT/results.json and OUT/results.md (run after every step), and
draw OUT/throughput.png (``--chart``, once at the end).

Reads WORK/steps.jsonl (one line per finished step: name, status, rc, seconds, budget) and each step's own
output: gpu_tests.log (pytest -v), flops.json (flops_check.py --json), ceilings.json / e2e.json
(train_throughput.py), pipeline.json (pipeline_throughput.py), profile.json (profile_step.py), ddp.json
(train_steps.py), ddp_gloo_{1,2}.json. A section whose step has not run or failed is still present, with its
status, so a reader sees what is missing and why. No torch import: this stays quick enough to run after
every step.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json   # noqa: E402  (this folder, also when imported from tests)

SECTIONS = ("gpu_tests", "dataset", "flops", "ceilings", "pipeline", "end_to_end", "profile", "ddp", "ddp_overhead")
GPU_TEST_STEPS = ("gpu_tests", "gpu_demo")
TT_COLUMNS = (("width", "width"), ("batch", "batch/rank"), ("variant", "variant"), ("data", "data"),
              ("img_s", "img/s"), ("step_ms", "step ms"), ("spread_pct", "spread %"),
              ("data_wait_pct", "data wait %"), ("peak_mem_mib", "torch peak MiB"),
              ("device_used_mib", "device used MiB"), ("mfu_pct", "MFU %"), ("act_tb_s", "act. TB/s"),
              ("bw_pct", "% of bandwidth"), ("first_step_s", "1st step s"), ("compile_s", "compile s"),
              ("cudagraph_skips", "graph skips"))
PYTEST_RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)
PYTEST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (tests/\S+::\S+) - (.*)$", re.M)   # -ra's short summary
PYTEST_SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|deselected|error).*) in [\d.]+s.* =+$", re.M)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_status(steps: dict, *names: str) -> dict:
    found = [steps[n] for n in names if n in steps]
    if not found:
        return {"status": "not run"}
    bad = [s for s in found if s["status"] != "ok"]
    return {"status": bad[0]["status"] if bad else "ok", "seconds": sum(s["seconds"] for s in found)}


def gpu_tests(work: Path, steps: dict) -> dict:
    """pytest -m gpu -v (the gpu_tests and gpu_demo steps): each test's outcome, read as it is printed, so a
    cut-off run still shows some."""
    text = "".join((work / f"{name}.log").read_text(errors="replace") for name in GPU_TEST_STEPS
                   if (work / f"{name}.log").exists())
    why = dict(PYTEST_FAILURE.findall(text))
    tests = [{"test": t, "outcome": o, "detail": why.get(t, "")[:200]} for t, o in PYTEST_RESULT.findall(text)]
    return {**step_status(steps, *GPU_TEST_STEPS), "tests": tests, "summary": PYTEST_SUMMARY.findall(text)}


def collect(work: Path, mode: str, data: Path, total_s: int) -> dict:
    steps = {}
    lines = (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").exists() else []
    for line in lines:
        s = json.loads(line)
        steps[s["name"]] = s
    res = {"mode": mode, "total_budget_s": total_s, "steps": list(steps.values()), "gpu_tests": gpu_tests(work, steps)}

    marker = read_json(data / ".complete.json") or {}
    ds = {**step_status(steps, "dataset"), "root": str(data), "params": marker}
    if marker and ds.get("seconds"):
        n = marker["num_train"] + marker["num_val"]
        ds["images_per_s_built"] = round(n / max(ds["seconds"], 1), 0)
    ds["why"] = ("a set of >= 20k photo JPEGs (500x375, q90) re-read from the page cache: it measures decode "
                 "and augmentation (what bounds a GPU node), not disk reads" if mode == "gpu"
                 else "toy size (CPU smoke run)")
    res["dataset"] = ds

    res["flops"] = {**step_status(steps, "flops"), "rows": read_json(work / "flops.json")}
    for section, name, file in (("ceilings", "ceilings", "ceilings.json"),
                                ("end_to_end", "end_to_end", "e2e.json"),
                                ("pipeline", "pipeline", "pipeline.json")):
        res[section] = {**step_status(steps, name), "result": read_json(work / file)}
    res["profile"] = {**step_status(steps, "profile"), "runs": (read_json(work / "profile.json") or {}).get("runs", [])}
    res["ddp"] = {**step_status(steps, "ddp"), "result": read_json(work / "ddp.json"),
                  "note": "train_ddp.py under torchrun, 1 rank, the trainer's defaults, stopped by SIGUSR1 after "
                          "the step count (the trainer's preemption path: checkpoint, exit 0, no final "
                          "evaluation); medians over the log windows after the first (compilation)"}

    names = [n for n in ("ddp_gloo_1", "ddp_gloo_2") if n in steps]
    ovh = {**step_status(steps, *names)} if names else {"status": "not run" if mode == "cpu" else
                                                       "not applicable (one GPU)"}
    rows = []
    for n in names:
        r = read_json(work / f"{n}.json")
        if r and r.get("rows"):
            rows.append(r["rows"][0])
    if len(rows) == 2:
        ovh["step_ms_1_rank"], ovh["step_ms_2_ranks"] = rows[0]["step_ms"], rows[1]["step_ms"]
        ovh["overhead_pct"] = round(100 * (rows[1]["step_ms"] / rows[0]["step_ms"] - 1), 1)
    ovh["rows"] = rows
    res["ddp_overhead"] = ovh
    meta = (res["ceilings"]["result"] or res["end_to_end"]["result"] or {}).get("meta")
    res["meta"] = meta
    return res


def decode_only_rate(res: dict) -> float | None:
    """The fastest DALI row of the pipeline step (the loader alone, no training)."""
    rows = [r for r in ((res["pipeline"]["result"] or {}).get("results") or []) if r["loader"] == "dali"]
    return max((r["images_per_s"] for r in rows), default=None)


def markdown(res: dict) -> str:
    out = [f"# FD-MobileNet benchmarks ({res['mode'].upper()} run)", ""]
    meta = res.get("meta")
    if meta:
        v = meta.get("versions", {})
        out += [f"{meta.get('started_utc')} · {meta.get('gpu') or 'no GPU'} (driver {meta.get('driver', '-')}) · "
                f"{meta.get('cpu')}, {meta.get('cores')} cores · torch {v.get('torch')}, DALI "
                f"{v.get('nvidia.dali', '-')} · commit {str(meta.get('git_commit'))[:10]}"
                f"{' + uncommitted changes' if meta.get('git_dirty') else ''}", ""]
    out += ["## Steps", "", markdown_table(res["steps"], (("name", "step"), ("status", "status"),
                                                          ("seconds", "s"), ("budget_s", "budget s"))), ""]
    g = res["gpu_tests"]
    out += ["## GPU tests (pytest -m gpu)", "", f"{g['status']}: {'; '.join(g['summary']) or 'no summary line'}"]
    if g["tests"]:
        out += ["", markdown_table(g["tests"], (("test", "test"), ("outcome", "outcome"), ("detail", "detail")))]
    ds = res["dataset"]
    out += ["", "## Dataset", "", f"{ds['status']}: {ds['root']} {json.dumps(ds.get('params'))}, "
            f"built at {ds.get('images_per_s_built', '-')} images/s. Why: {ds['why']}.", ""]
    out += ["## FLOPs check", "", f"{res['flops']['status']}"]
    if res["flops"]["rows"]:
        out += ["", markdown_table(res["flops"]["rows"], (("width", "width"), ("macs", "MACs"),
                                                         ("params", "params"), ("ok", "matches paper")))]
    for section, title in (("ceilings", "Model-only ceilings (synthetic device-resident data)"),
                           ("end_to_end", "End to end (real JPEGs) vs the same variant's ceiling")):
        r = res[section]
        out += ["", f"## {title}", "", r["status"]]
        if r["result"]:
            extra = (("loader_threads", "threads"), ("hw_decoder_load", "hw_decoder_load"), ("prefetch", "prefetch"),
                     ("ceiling_img_s", "ceiling img/s"), ("e2e_vs_ceiling", "e2e/ceiling")) \
                if section == "end_to_end" else ()
            out += ["", f"MFU peak: {r['result'].get('peak')}; measured bf16 matmul: "
                        f"{r['result'].get('matmul_bf16_tflops', 'n/a')} TFLOP/s. Bandwidth: "
                        f"{r['result'].get('bandwidth')}; measured copy: {r['result'].get('copy_tb_s', 'n/a')} TB/s. "
                        f"act. TB/s = the activation traffic model (fdmobilenet.flops: 5 accesses per activation "
                        f"element per step) x img/s; device used = cudaMemGetInfo, so DALI's pools count.", "",
                    markdown_table(r["result"]["rows"], TT_COLUMNS + extra)]
            if r["result"].get("errors"):
                out += ["", "errors: " + "; ".join(r["result"]["errors"])]
    p = res["pipeline"]
    out += ["", "## Data pipeline alone (pipeline_throughput.py)", "", p["status"]]
    if p["result"]:
        out += ["", markdown_table(p["result"].get("results", []),
                                   (("loader", "loader"), ("decode", "decode"), ("threads_or_workers", "threads"),
                                    ("hw_decoder_load", "hw_decoder_load"), ("batch", "batch"),
                                    ("images_per_s", "img/s"), ("ratio_to_torchvision", "x torchvision")))]
    pr = res["profile"]
    out += ["", "## Profile (torch.profiler, profile_step.py)", "", pr["status"]]
    for run in pr["runs"]:
        out += ["", f"### {run['name']}: {run['variant']}, {run['data']}, width {run['width']}, batch {run['batch']}",
                "", f"{run['steps']} steps of {run['step_ms']} ms under the profiler "
                    f"({run['img_s_under_profiler']} img/s); GPU busy {run['gpu_busy_pct']} % of the wall time; "
                    f"trace: {run['trace']}. Top {run['table_of']} by own time:", "",
                markdown_table(run["rows"], (("name", "name"), ("pct_of_step", "% of step"),
                                             ("us_per_step", "us per step"), ("calls_per_step", "calls per step")))]
    d = res["ddp"]
    out += ["", "## torchrun + train_ddp.py (the trainer's defaults)", "", f"{d['status']}: {d['note']}"]
    if d["result"]:
        r = d["result"]
        out += ["", f"stop requested at global step {r['stop_requested_at_step']}; "
                    f"{r.get('preempted') or 'no preemption line'}; "
                    f"median {r['median_img_s']} img/s, data wait {r['median_data_wait_pct']} % "
                    f"({len(r['windows'])} log windows)"]
    o = res["ddp_overhead"]
    out += ["", "## DDP overhead (gloo, CPU: 1 rank vs 2 ranks, same per-rank batch)", "", o["status"]]
    if o.get("overhead_pct") is not None:
        out += ["", f"step {o['step_ms_1_rank']} ms (1 rank) -> {o['step_ms_2_ranks']} ms (2 ranks): "
                    f"+{o['overhead_pct']}%"]
    return "\n".join(out) + "\n"


def chart(res: dict, path: Path) -> bool:
    """One panel per width: img/s of every ceiling variant and every end-to-end loader setting as bars, the
    decode-only rate (the DALI pipeline alone) and the compiled ceiling as horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ceilings = (res["ceilings"]["result"] or {}).get("rows") or []
    e2e = (res["end_to_end"]["result"] or {}).get("rows") or []
    widths = sorted({r["width"] for r in ceilings + e2e}, reverse=True)
    if not widths:
        return False
    decode = decode_only_rate(res)
    fig, axes = plt.subplots(1, len(widths), figsize=(7 * len(widths), 5), squeeze=False)
    for ax, width in zip(axes[0], widths):
        bars = [(f"{r['variant']} b{r['batch']}", r["img_s"], "tab:blue") for r in ceilings if r["width"] == width]
        bars += [(f"e2e {r['data']} b{r['batch']}", r["img_s"], "tab:orange") for r in e2e if r["width"] == width]
        ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=60, ha="right", fontsize=7)
        ceiling = max((r["ceiling_img_s"] for r in e2e if r["width"] == width), default=None)
        if ceiling:
            ax.axhline(ceiling, color="tab:blue", linestyle="--", label=f"ceiling of the e2e variant {ceiling:,.0f}")
        if decode:
            ax.axhline(decode, color="tab:green", linestyle=":", label=f"DALI decode alone {decode:,.0f}")
        ax.set_title(f"FD-MobileNet {width:g}x: img/s (blue: model only, orange: end to end)")
        ax.set_ylabel("images / s")
        if ceiling or decode:
            ax.legend(fontsize=8)
    meta = res.get("meta") or {}
    fig.suptitle(f"{meta.get('gpu') or 'CPU'} · commit {str(meta.get('git_commit'))[:10]} · {res['mode']} run",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def record_run(results_md: Path, results: Path | None = None) -> None:
    """Append a fetched results.md to RESULTS.md (or ``results``), its headings one level down so that they
    stay inside the appended section."""
    from common import RESULTS, record
    text = results_md.read_text().splitlines()
    mode = "GPU" if "(GPU run)" in text[0] else "CPU"
    body = ["#" + line if line.startswith("#") and not line.startswith("# ") else line for line in text[1:]]
    record(f"run_gpu.sh ({mode})", "\n".join(body).strip("\n"), results or RESULTS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="After a GPU run: python benchmarks/collect_results.py --record "
                                        "OUT/results.md appends it to benchmarks/RESULTS.md")
    ap.add_argument("--record", metavar="RESULTS_MD", help="only append this results.md to RESULTS.md")
    ap.add_argument("--work")
    ap.add_argument("--out")
    ap.add_argument("--mode", choices=("gpu", "cpu"))
    ap.add_argument("--data")
    ap.add_argument("--total-s", type=int)
    ap.add_argument("--chart", action="store_true", help="also draw OUT/throughput.png")
    args = ap.parse_args(argv)
    if args.record:
        record_run(Path(args.record))
        return 0
    if None in (args.work, args.out, args.mode, args.data, args.total_s):
        ap.error("--work, --out, --mode, --data and --total-s are required (or --record FILE)")
    res = collect(Path(args.work), args.mode, Path(args.data), args.total_s)
    if args.chart:
        res["chart"] = "throughput.png" if chart(res, Path(args.out) / "throughput.png") else "not drawn"
    write_json(Path(args.out) / "results.json", res)
    (Path(args.out) / "results.md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

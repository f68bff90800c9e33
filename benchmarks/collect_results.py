"""Merge the step outputs of run_gpu.sh into OUT/results.json and OUT/results.md (run after every step).

Reads WORK/steps.jsonl (one line per finished step: name, status, rc, seconds, budget) and each step's own
output (ceilings.json / e2e.json from train_throughput.py, pipeline.json from pipeline_throughput.py,
flops.json from flops_check.py --json, the DDP run's jsonl log, ddp_gloo_{1,2}.json). A section whose step
has not run or failed is still present, with its status, so a reader sees what is missing and why.
No torch import: this stays quick enough to run after every step.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json   # noqa: E402  (this folder, also when imported from tests)

SECTIONS = ("dataset", "flops", "ceilings", "end_to_end", "pipeline", "ddp", "ddp_overhead")
TT_COLUMNS = (("width", "width"), ("batch", "batch/rank"), ("variant", "variant"), ("data", "data"),
              ("img_s", "img/s"), ("step_ms", "step ms"), ("spread_pct", "spread %"),
              ("peak_mem_mib", "peak MiB"), ("mfu_pct", "MFU %"), ("first_step_s", "1st step s"),
              ("compile_s", "compile s"))


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


def collect(work: Path, mode: str, data: Path, total_s: int) -> dict:
    steps = {}
    lines = (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").exists() else []
    for line in lines:
        s = json.loads(line)
        steps[s["name"]] = s
    res = {"mode": mode, "total_budget_s": total_s, "steps": list(steps.values())}

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

    epochs = []
    for log in sorted((work / "ddp").glob("*.jsonl")) if (work / "ddp").is_dir() else []:
        epochs += [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    res["ddp"] = {**step_status(steps, "ddp"), "epochs": epochs,
                  "note": "train_ddp.py under torchrun, 1 rank (the trainer wraps DDP only from 2 ranks); "
                          "the last epoch's img/s excludes compilation"}

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
    ds = res["dataset"]
    out += ["## Dataset", "", f"{ds['status']}: {ds['root']} {json.dumps(ds.get('params'))}, "
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
            extra = (("ceiling_img_s", "ceiling img/s"), ("e2e_vs_ceiling", "e2e/ceiling"),
                     ("loader_threads", "loader threads")) if section == "end_to_end" else ()
            out += ["", f"MFU peak: {r['result'].get('peak')}; measured bf16 matmul: "
                        f"{r['result'].get('matmul_bf16_tflops', 'n/a')} TFLOP/s", "",
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
    d = res["ddp"]
    out += ["", "## torchrun + train_ddp.py (DALI)", "", f"{d['status']}: {d['note']}"]
    if d["epochs"]:
        rounded = [{k: round(v, 3) if isinstance(v, float) else v for k, v in e.items()} for e in d["epochs"]]
        out += ["", markdown_table(rounded, (("epoch", "epoch"), ("img_s", "img/s"),
                                                 ("epoch_time_s", "epoch s"), ("train_loss", "loss"),
                                                 ("val_top1", "val top-1")))]
    o = res["ddp_overhead"]
    out += ["", "## DDP overhead (gloo, CPU: 1 rank vs 2 ranks, same per-rank batch)", "", o["status"]]
    if o.get("overhead_pct") is not None:
        out += ["", f"step {o['step_ms_1_rank']} ms (1 rank) -> {o['step_ms_2_ranks']} ms (2 ranks): "
                    f"+{o['overhead_pct']}%"]
    return "\n".join(out) + "\n"


def record_run(results_md: Path, results: Path | None = None) -> None:
    """Append a fetched results.md to RESULTS.md (or ``results``), its headings one level down so that they
    stay inside the appended section."""
    from common import RESULTS, record
    text = results_md.read_text().splitlines()
    mode = "GPU" if "(GPU run)" in text[0] else "CPU"
    body = ["#" + line if line.startswith("## ") else line for line in text[1:]]
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
    args = ap.parse_args(argv)
    if args.record:
        record_run(Path(args.record))
        return 0
    if None in (args.work, args.out, args.mode, args.data, args.total_s):
        ap.error("--work, --out, --mode, --data and --total-s are required (or --record FILE)")
    res = collect(Path(args.work), args.mode, Path(args.data), args.total_s)
    write_json(Path(args.out) / "results.json", res)
    (Path(args.out) / "results.md").write_text(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Merge the step outputs of run_gpu.sh into OUT/results.json and OUT/results.md (run within a second of any
change while the box runs, so a row is there as soon as it is measured), and draw OUT/throughput.png
(``--chart``, once at the end).

Reads WORK/steps.jsonl (one line per finished step: name, status, rc, seconds, budget, limit) and each step's
own output, as far as it got: hw_decoder.json (python -m pipelines.hw_decoder), end_to_end.json, ceilings.json,
batch_512.json, variants.json (train_throughput.py), stored_size.json (stored_size.py), dali_sweep.json
(pipeline_throughput.py), profile.json
(profile_step.py), ddp.json (train_steps.py), ddp_gloo_{1,2}.json, the gpu tests' pytest -v output, and every
step's log for what the box must not do silently (a loader's pre-flight scanning the photos instead of using
the manifests; dynamo hitting its recompile limit). A section whose step has not run, was cut or failed is
still present with its status, so a reader sees what is missing and why; the headline table says "not
measured" where a number is missing. No torch import: this stays quick enough to run every second.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# this folder's common.py, also when imported from tests
from common import markdown_table, stored_bytes, stored_size_columns, write_json   # noqa: E402

MODEL_ONLY_STEPS = ("ceilings", "batch_512", "variants")
TRAIN_THROUGHPUT_STEPS = ("end_to_end", *MODEL_ONLY_STEPS)
SECTIONS = ("headline", "hw_decoder", "dataset", "end_to_end", "model_only", "stored_size", "dali_sweep",
            "compile_check", "profile", "ddp", "gpu_tests", "ddp_overhead")
GPU_TEST_STEPS = ("gpu_tests", "gpu_demo")
NOT_MEASURED = "not measured"
TT_COLUMNS = (("width", "width"), ("batch", "batch/rank"), ("variant", "variant"), ("data", "data"),
              ("img_s", "img/s"), ("step_ms", "step ms"), ("spread_pct", "spread %"),
              ("data_wait_pct", "data wait %"), ("peak_mem_mib", "torch peak MiB"),
              ("device_used_mib", "device used MiB"), ("mfu_pct", "MFU %"), ("act_tb_s", "act. TB/s"),
              ("bw_pct", "% of bandwidth"), ("first_step_s", "1st step s"), ("compile_s", "compile s"),
              ("graphs", "graphs compiled"), ("fx_cache", "FX cache"), ("graphs_in_windows", "graphs in windows"),
              ("cudagraph_skips", "graph skips"))
PYTEST_RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)
PYTEST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (tests/\S+::\S+) - (.*)$", re.M)   # -ra's short summary
PYTEST_SUMMARY = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|deselected|error).*) in [\d.]+s.* =+$", re.M)
STARTUP_SCAN = re.compile(r"^pipelines\.splits: (\S+): ([\d,]+) files (?:checked|decoded)", re.M)
RECOMPILE_LIMIT_HIT = re.compile(r"torch\._dynamo hit config\.(\w+) \((\d+)\)")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def step_status(steps: dict, selected: list[str], *names: str) -> dict:
    """The status of one or more steps: ok, the first bad one's status, 'not finished' (in this box, not
    recorded yet: running, or the box was cut) or 'not in this box' (--from / --only left it out)."""
    found = [steps[n] for n in names if n in steps]
    pending = [n for n in names if n in selected and n not in steps]
    if not found:
        return {"status": "not finished" if pending else "not in this box"}
    bad = [s for s in found if s["status"] != "ok"]
    status = bad[0]["status"] if bad else "not finished" if pending else "ok"
    return {"status": status, "seconds": sum(s["seconds"] for s in found)}


def gpu_tests(work: Path, steps: dict, selected: list[str]) -> dict:
    """pytest -m gpu -v (the gpu_tests and gpu_demo steps): each test's outcome, read as it is printed, so a
    cut-off run still shows some."""
    text = "".join(read_text(work / f"{name}.log") for name in GPU_TEST_STEPS)
    why = dict(PYTEST_FAILURE.findall(text))
    tests = [{"test": t, "outcome": o, "detail": why.get(t, "")[:200]} for t, o in PYTEST_RESULT.findall(text)]
    return {**step_status(steps, selected, *GPU_TEST_STEPS), "tests": tests, "summary": PYTEST_SUMMARY.findall(text)}


def dataset(work: Path, steps: dict, selected: list[str], data: Path, mode: str) -> dict:
    """The photo set, its manifests, and the proof that they served: the pre-flight scans (files read instead
    of the manifest's verdicts) that the later steps' logs report - 0 when every loader used the manifests."""
    marker = read_json(data / ".complete.json") or {}
    ds = {**step_status(steps, selected, "dataset"), "root": str(data), "params": marker,
          "manifests": [split for split in ("train", "val") if (data / split / ".manifest.tsv").is_file()]}
    if marker and ds.get("seconds"):
        n = marker["num_train"] + marker["num_val"]
        ds["images_per_s_built"] = round(n / max(ds["seconds"], 1), 0)
    ds["scans_after_dataset"] = [{"step": name, "folder": folder, "files": int(files.replace(",", ""))}
                                 for name in steps if name != "dataset"
                                 for folder, files in STARTUP_SCAN.findall(read_text(work / f"{name}.log"))]
    ds["why"] = ("a set of >= 20k photo JPEGs (500x375, q90) re-read from the page cache: it measures decode "
                 "and augmentation (what bounds a GPU node), not disk reads" if mode == "gpu"
                 else "toy size (CPU smoke run)")
    return ds


def compile_check(res: dict, work: Path, steps: dict) -> dict:
    """What compiled where, and whether anything ran eagerly or compiled while timed: the recompile-limit
    setting of each compiling step, graphs compiled inside timed windows (must be 0), and any 'torch._dynamo
    hit config.recompile_limit' in a step's log (dynamo's fall-back to eager code, which the benchmarks make
    an error and train_ddp.py would only log)."""
    settings, in_windows, graphs = {}, [], {}
    for name in TRAIN_THROUGHPUT_STEPS:
        result = res["model_only"]["results"].get(name) if name != "end_to_end" else res["end_to_end"]["result"]
        if not result:
            continue
        if result.get("compile_check"):
            settings[name] = result["compile_check"]
        for row in result.get("rows", []):
            if "graphs" in row:
                graphs.setdefault(name, []).append(f"{row['width']:g}x b{row['batch']} {row['variant']} "
                                                   f"{row['data']}: {row['graphs']} ({row['fx_cache']})")
            if row.get("graphs_in_windows"):
                in_windows.append(f"{name}: {row['width']:g}x b{row['batch']} {row['variant']} {row['data']}")
    limit_hits = [{"step": name, "setting": setting, "value": int(value)} for name in steps
                  for setting, value in RECOMPILE_LIMIT_HIT.findall(read_text(work / f"{name}.log"))]
    problems = ([f"graphs compiled inside timed windows: {'; '.join(in_windows)}"] if in_windows else []) + \
               [f"{h['step']}: dynamo hit config.{h['setting']} ({h['value']}) and ran eagerly" for h in limit_hits]
    status = ("problems: " + "; ".join(problems)) if problems else \
        "ok: no eager fall-back, no graph compiled inside a timed window" if graphs else "nothing compiled yet"
    return {"status": status, "settings": settings, "graphs_per_row": graphs, "limit_hits": limit_hits,
            "compiled_in_windows": in_windows}


def headline(res: dict) -> dict:
    """Per width: DALI and the DataLoader end to end, their ratio, e2e / ceiling, data wait, the compiled and
    compiled + CUDA graphs ceilings at the same batch, the JPEG engines' use: the numbers the box is for."""
    e2e = (res["end_to_end"]["result"] or {}).get("rows", [])
    ceilings = (res["model_only"]["results"].get("ceilings") or {}).get("rows", [])
    rows = []
    for width in sorted({r["width"] for r in e2e + ceilings}, reverse=True):
        dali = next((r for r in e2e if r["width"] == width and r["loader"] == "dali"), None)
        dl = next((r for r in e2e if r["width"] == width and r["loader"] == "torchvision"), None)
        ceiling = {r["variant"]: r["img_s"] for r in ceilings if r["width"] == width}

        def get(row, key):
            return row[key] if row and key in row else NOT_MEASURED
        rows.append({"width": width, "dali_img_s": get(dali, "img_s"), "dataloader_img_s": get(dl, "img_s"),
                     "dali_vs_dataloader": round(dali["img_s"] / dl["img_s"], 2) if dali and dl else NOT_MEASURED,
                     "dali_e2e_vs_ceiling": get(dali, "e2e_vs_ceiling"),
                     "dataloader_e2e_vs_ceiling": get(dl, "e2e_vs_ceiling"),
                     "dali_data_wait_pct": get(dali, "data_wait_pct"),
                     "dataloader_data_wait_pct": get(dl, "data_wait_pct"),
                     "dali_setting": f"hw {get(dali, 'hw_decoder_load')}, {get(dali, 'loader_threads')} thr",
                     "jpeg_engine_max_pct": get(dali, "jpeg_engine_max_pct"),
                     "ceiling_compiled": ceiling.get("compiled", get(dali or dl, "ceiling_img_s")),
                     "ceiling_cuda_graphs": ceiling.get("compiled_cuda_graphs", NOT_MEASURED)})
    return {"rows": rows, "hw_decoder": (res["hw_decoder"]["result"] or {}).get("status", NOT_MEASURED)}


def rerun_from(selected: list[str], steps: dict) -> str | None:
    """The first step of this box that did not finish ok: where a second box starts (--from)."""
    return next((name for name in selected if steps.get(name, {}).get("status") != "ok"), None)


def collect(work: Path, mode: str, data: Path, total_s: int, selected: list[str]) -> dict:
    steps = {}
    for line in read_text(work / "steps.jsonl").splitlines():
        try:
            s = json.loads(line)
        except ValueError:   # a line being written as this reads: the next collection has it whole
            continue
        steps[s["name"]] = s
    res = {"mode": mode, "total_budget_s": total_s, "selected": selected, "steps": list(steps.values()),
           "rerun_from": rerun_from(selected, steps)}
    res["hw_decoder"] = {**step_status(steps, selected, "hw_decoder"), "result": read_json(work / "hw_decoder.json")}
    res["dataset"] = dataset(work, steps, selected, data, mode)
    res["end_to_end"] = {**step_status(steps, selected, "end_to_end"), "result": read_json(work / "end_to_end.json")}
    res["model_only"] = {"steps": {name: step_status(steps, selected, name) for name in MODEL_ONLY_STEPS},
                         "results": {name: read_json(work / f"{name}.json") for name in MODEL_ONLY_STEPS}}
    res["stored_size"] = {**step_status(steps, selected, "stored_size"),
                          "result": read_json(work / "stored_size.json")}
    res["dali_sweep"] = {**step_status(steps, selected, "dali_sweep"), "result": read_json(work / "dali_sweep.json")}
    res["compile_check"] = compile_check(res, work, steps)
    res["profile"] = {**step_status(steps, selected, "profile"),
                      "runs": (read_json(work / "profile.json") or {}).get("runs", [])}
    res["ddp"] = {**step_status(steps, selected, "ddp"), "result": read_json(work / "ddp.json"),
                  "note": "train_ddp.py under torchrun, 1 rank, the trainer's defaults, stopped by SIGUSR1 after "
                          "the step count (the trainer's preemption path: checkpoint, exit 0, no final "
                          "evaluation); medians over the log windows after the first (compilation)"}
    res["gpu_tests"] = gpu_tests(work, steps, selected)

    names = [n for n in ("ddp_gloo_1", "ddp_gloo_2") if n in steps]
    ovh = {**step_status(steps, selected, *names)} if names else \
        {"status": "not finished" if "ddp_gloo_1" in selected else "not applicable (one GPU)" if mode == "gpu"
         else "not in this box"}
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
    res["headline"] = headline(res)
    sources = [res["end_to_end"]["result"], *res["model_only"]["results"].values()]
    res["meta"] = next((r["meta"] for r in sources if r and r.get("meta")), None)
    return res


def decode_only_rate(res: dict) -> float | None:
    """The fastest DALI row of the sweep (the loader alone, no training)."""
    rows = [r for r in ((res["dali_sweep"]["result"] or {}).get("results") or []) if r["loader"] == "dali"]
    return max((r["images_per_s"] for r in rows), default=None)


def model_only_rows(res: dict) -> list[dict]:
    return [{"step": name, **row} for name in MODEL_ONLY_STEPS
            for row in (res["model_only"]["results"].get(name) or {}).get("rows", [])]


def markdown(res: dict) -> str:
    out = [f"# FD-MobileNet benchmarks ({res['mode'].upper()} run)", ""]
    meta = res.get("meta")
    if meta:
        v = meta.get("versions", {})
        out += [f"{meta.get('started_utc')} · {meta.get('gpu') or 'no GPU'} (driver {meta.get('driver', '-')}) · "
                f"{meta.get('cpu')}, {meta.get('cores')} cores · torch {v.get('torch')}, DALI "
                f"{v.get('nvidia.dali', '-')} · commit {str(meta.get('git_commit'))[:10]}"
                f"{' + uncommitted changes' if meta.get('git_dirty') else ''}", ""]
    h = res["headline"]
    out += ["## Headline", "", f"Hardware JPEG decoder: {h['hw_decoder']}", "",
            markdown_table(h["rows"], (("width", "width"), ("dali_img_s", "DALI img/s"),
                                       ("dataloader_img_s", "DataLoader img/s"),
                                       ("dali_vs_dataloader", "DALI / DataLoader"),
                                       ("dali_e2e_vs_ceiling", "DALI e2e / ceiling"),
                                       ("dataloader_e2e_vs_ceiling", "DataLoader e2e / ceiling"),
                                       ("dali_data_wait_pct", "DALI data wait %"),
                                       ("dataloader_data_wait_pct", "DataLoader data wait %"),
                                       ("dali_setting", "DALI setting"),
                                       ("jpeg_engine_max_pct", "JPEG engines max %"),
                                       ("ceiling_compiled", "ceiling compiled img/s"),
                                       ("ceiling_cuda_graphs", "ceiling + CUDA graphs img/s")))
            if h["rows"] else NOT_MEASURED, ""]
    selected = ", ".join(res["selected"])
    out += ["## Steps", "", f"This box: {selected}" + (f". Rerun from: `--from {res['rerun_from']}`."
                                                       if res["rerun_from"] else "."), "",
            markdown_table(res["steps"], (("name", "step"), ("status", "status"), ("seconds", "s"),
                                          ("budget_s", "budget s"), ("limit_s", "limit s"),
                                          ("started_at_s", "started at s"))), ""]
    hw = res["hw_decoder"]
    out += ["## Hardware JPEG decoder (nvJPEG, pipelines.hw_decoder)", "", hw["status"]]
    if hw["result"]:
        r = hw["result"]
        out += ["", f"{r['gpu'] + ': ' if r['gpu'] else ''}{r['status']}. libnvjpeg {r['nvjpeg_version'] or '-'} "
                    f"({r['library'] or 'not found'}); nvjpegCreateEx DEFAULT: {r['default_backend'] or '-'}, "
                    f"HARDWARE: {r['hardware_backend'] or '-'}; nvjpegGetHardwareDecoderInfo: "
                    f"{r['hardware_decoder_info'] or '-'}. The JPEG engines' NVML utilisation during each DALI "
                    f"row is in the end-to-end and sweep tables."]
    ds = res["dataset"]
    scans = ds["scans_after_dataset"]
    out += ["", "## Dataset", "", f"{ds['status']}: {ds['root']} {json.dumps(ds.get('params'))}, "
            f"built at {ds.get('images_per_s_built', '-')} images/s; manifests: "
            f"{', '.join(ds['manifests']) or 'none'}; "
            f"pre-flight scans by the later steps: {len(scans)}"
            + (" (" + "; ".join(f"{s['step']}: {s['files']} files of {s['folder']}" for s in scans[:6]) + ")"
               if scans else "") + f". Why: {ds['why']}.", ""]
    e2e = res["end_to_end"]
    out += throughput_section(
        "End to end (real JPEGs) vs the same trainer's ceiling", e2e["status"], e2e["result"],
        (e2e["result"] or {}).get("rows", []), (e2e["result"] or {}).get("errors", []),
        (("loader_threads", "threads"), ("hw_decoder_load", "hw_decoder_load"), ("prefetch", "prefetch"),
         ("jpeg_engine_max_pct", "JPEG engines max %"), ("ceiling_img_s", "ceiling img/s"),
         ("e2e_vs_ceiling", "e2e/ceiling")))
    results = [r for r in res["model_only"]["results"].values() if r]
    out += throughput_section(
        "Model-only ceilings (synthetic device-resident data)",
        "; ".join(f"{name}: {s['status']}" for name, s in res["model_only"]["steps"].items()),
        results[0] if results else None, model_only_rows(res), [e for r in results for e in r.get("errors", [])],
        (("step", "step"),))
    out += stored_size_section(res["stored_size"])
    p = res["dali_sweep"]
    out += ["## Data pipeline alone: hw_decoder_load x threads (pipeline_throughput.py)", "", p["status"]]
    if p["result"]:
        out += ["", f"{p['result'].get('rounds_done', '?')} of {p['result'].get('rounds')} rounds done", "",
                markdown_table(p["result"].get("results", []),
                               (("loader", "loader"), ("decode", "decode"), ("threads_or_workers", "threads"),
                                ("hw_decoder_load", "hw_decoder_load"), ("batch", "batch"),
                                ("images_per_s", "img/s"), ("ratio_to_torchvision", "x torchvision"),
                                ("jpeg_engine_max_pct", "JPEG engines max %")))]
    c = res["compile_check"]
    out += ["", "## Compile check", "", c["status"]]
    for name, s in c["settings"].items():
        out += [f"- {name}: recompile limit {s['recompile_limit']}, reaching it is "
                f"{'an error' if s['limit_hit_is_an_error'] else 'NOT an error (this torch lacks the switch)'}; "
                f"inductor cache {s['inductor_cache_dir']}; graphs compiled (FX cache): "
                f"{'; '.join(c['graphs_per_row'].get(name, [])) or 'none'}"]
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
    g = res["gpu_tests"]
    out += ["", "## GPU tests (pytest -m gpu)", "", f"{g['status']}: {'; '.join(g['summary']) or 'no summary line'}"]
    if g["tests"]:
        out += ["", markdown_table(g["tests"], (("test", "test"), ("outcome", "outcome"), ("detail", "detail")))]
    o = res["ddp_overhead"]
    out += ["", "## DDP overhead (gloo, CPU: 1 rank vs 2 ranks, same per-rank batch)", "", o["status"]]
    if o.get("overhead_pct") is not None:
        out += ["", f"step {o['step_ms_1_rank']} ms (1 rank) -> {o['step_ms_2_ranks']} ms (2 ranks): "
                    f"+{o['overhead_pct']}%"]
    return "\n".join(out) + "\n"


def stored_size_section(section: dict) -> list[str]:
    """The pre-resized rows: each stored shorter side (pipelines.resize) at each training resolution."""
    out = ["## Pre-resized copies: stored shorter side x training resolution (stored_size.py)", "",
           section["status"]]
    r = section["result"]
    if r:
        s = r["settings"]
        out += ["", f"{s['num_images']} photos 500x375 q90 and their pipelines.resize copies (q{s['quality']}); "
                    f"mean bytes per image: {stored_bytes(r['bytes'])}; the loaders alone on {s['device']}, batch "
                    f"{s['batch']}, median of {s['rounds']} alternating rounds of {s['steps']} batches", "",
                markdown_table(r.get("pipeline", []), stored_size_columns(s["res"]))]
    return out + [""]


def throughput_section(title: str, status: str, result: dict | None, rows: list[dict], errors: list[str],
                       extra: tuple) -> list[str]:
    """A train_throughput.py section: status, the device's peaks (from ``result``), the rows, the errors."""
    out = [f"## {title}", "", status]
    if result:
        out += ["", f"MFU peak: {result.get('peak')}; measured bf16 matmul: {result.get('matmul_bf16_tflops', 'n/a')} "
                    f"TFLOP/s. Bandwidth: {result.get('bandwidth')}; measured copy: {result.get('copy_tb_s', 'n/a')} "
                    f"TB/s. act. TB/s = the activation traffic model (fdmobilenet.flops: 5 accesses per activation "
                    f"element per step) x img/s; device used = cudaMemGetInfo, so DALI's pools count."]
    if rows:
        out += ["", markdown_table(rows, TT_COLUMNS + extra)]
    if errors:
        out += ["", "errors: " + "; ".join(errors)]
    return out + [""]


def chart(res: dict, path: Path) -> bool:
    """One panel per width: img/s of every ceiling variant and every end-to-end loader setting as bars, the
    decode-only rate (the DALI pipeline alone) and the compiled ceiling as horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ceilings = model_only_rows(res)
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
    ap.add_argument("--steps", default="", help="the steps this box runs, space-separated, in order")
    ap.add_argument("--chart", action="store_true", help="also draw OUT/throughput.png")
    args = ap.parse_args(argv)
    if args.record:
        record_run(Path(args.record))
        return 0
    if None in (args.work, args.out, args.mode, args.data, args.total_s):
        ap.error("--work, --out, --mode, --data and --total-s are required (or --record FILE)")
    res = collect(Path(args.work), args.mode, Path(args.data), args.total_s, args.steps.split())
    if args.chart:
        res["chart"] = "throughput.png" if chart(res, Path(args.out) / "throughput.png") else "not drawn"
    # each file replaced whole, results.md first: the box may be killed between any two writes, and what
    # results.json shows is then in results.md too
    md = Path(args.out) / "results.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown(res))
    os.replace(tmp, md)
    write_json(Path(args.out) / "results.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

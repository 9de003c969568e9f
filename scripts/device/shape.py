"""Python half of scripts/device/shape.sh: a published-shape pair (Gemma-4-31B or Qwen3-32B, configs only), the
client, and the summary.

Standard library plus this repository (the GPU box has no package registry). Subcommands:
  prepare   --shape S --out DIR --blocks 8 16 32 64  target + tokenizer, one drafter config per block size, checked
  bench     --port P --out FILE ...                greedy c1 streaming requests: ms/token, ms/step, GPU memory in use
  run-info  --dir D --shape S --stages ... ...     record the run's settings (run.json)
  stage     --dir D --stage S --status ...         record how a stage went (ok / failed / skipped), its startup time
  summarize --dir D [--print]                      server logs + bench JSON -> summary.json (and the table)

Stages: `ar` (plain decoding), `bN` (ours, chain, block N), `tN` (ours in tree mode: N draft nodes, top-4 per
position, over the drafter's block of 16). Each DFLASH stage's step is set against the AR decode step (AR ms/token
at concurrency 1): our worker's whole GPU step (DFLASH_SGLANG_STEP_TIMING=1), and the client's end-to-end step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from dflash_sglang.sglang.plugin import SERVING_OURS
from dflash_sglang.sglang.step_timing import parse_log
from shape_stages import CHAIN_BLOCKS, STAGES, TREE_TOPK  # this folder's scripts run with it on sys.path

SHAPES = ("gemma-4-31b", "qwen3-32b")
DEFAULT_SHAPE = "gemma-4-31b"
# Acceptance lengths published for the shape's z-lab drafter at B = 16. Gemma-4-31B (z-lab/gemma-4-31B-it-DFlash):
# Math500 c1, vLLM on a B300, thinking on -- quoted by our brief, the table row itself not read in any stored copy.
PUBLISHED_TAU_B16 = {"gemma-4-31b": {"math500": 8.59}, "qwen3-32b": {}}
# Step-cost bars (our step / one AR decode step), from the issues: issue 8 for the 32B dense shape at tau ~1 (the
# tree bar holds for N <= 64).
BARS = {"qwen3-32b": {"source": "issue 8", "chain": 1.10, "tree": 1.20, "tree_max_budget": 64}}
TIMING_ON = "dflash_sglang: step timing on"
# DFlashWorker's startup line in tree mode (worker.py).
TREE_ON = re.compile(r"dflash_sglang: tree mode, (\d+) draft nodes \(top-(\d+) per position\)")
PROMPTS = ["Explain, step by step, how a harbor lock raises a ship.",
           "Write a long story about a violin found in an attic.",
           "Describe the history of the old map room in detail.",
           "List and explain twenty facts about winter rain."]


# --------------------------------------------------------------------------------------------- setup


def cmd_prepare(args) -> int:
    from dflash_sglang.config import DFlashConfigError, TargetInfo, load_drafter_config, validate_pair
    from dflash_sglang.shapes import write_shape

    target, drafter = write_shape(args.shape, args.out)
    base = json.loads((drafter / "config.json").read_text())
    info = TargetInfo.from_path(target)
    problems = []
    for block in args.blocks:
        folder = Path(args.out) / f"drafter-b{block}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(dict(base, block_size=block), indent=2) + "\n")
        try:
            problems += [f"B={block}: {m}" for m in validate_pair(load_drafter_config(folder), info, block)]
        except DFlashConfigError as e:
            problems += [f"B={block}: {m}" for m in e.messages]
    for message in problems:
        print(f"error: {message}", file=sys.stderr)
    drafters = {block: str(Path(args.out) / f"drafter-b{block}") for block in args.blocks}
    print(json.dumps({"shape": args.shape, "target": str(target), "drafters": drafters}))
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------- client


def stream_generate(port: int, prompt: str | list[int], max_tokens: int, timeout: float) -> dict:
    """One greedy streaming /generate of a text or of token ids: arrival times of the first and last chunks,
    tokens, verify steps."""
    body = {"text" if isinstance(prompt, str) else "input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = None
    meta: dict = {}
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            meta = json.loads(line[len("data:"):])["meta_info"]
    if first is None:
        raise RuntimeError("the server streamed no chunk")
    tokens = int(meta["completion_tokens"])
    return {"ttft_ms": (first - start) * 1e3, "decode_ms": (last - first) * 1e3, "tokens": tokens,
            "verify_steps": meta.get("spec_verify_ct"), "e2e_ms": (last - start) * 1e3}


def visible_gpu(environ=os.environ) -> str:
    """The GPU the servers run on, as nvidia-smi -i takes it: the first entry of CUDA_VISIBLE_DEVICES (an index or
    a UUID), else 0. nvidia-smi itself ignores CUDA_VISIBLE_DEVICES and numbers GPUs in PCI bus order."""
    first = environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return first or "0"


def gpu_memory_mib() -> dict | None:
    try:
        query = ["nvidia-smi", "-i", visible_gpu(), "--query-gpu=name,memory.used,memory.total",
                 "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
        name, used, total = (field.strip() for field in out.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None
    return {"gpu": name, "index": visible_gpu(), "used_mib": int(used), "total_mib": int(total)}


def long_prompt(index: int, tokens: int) -> list[int]:
    """Prompt `index` of `tokens` token ids, distinct per index (no radix-cache hit between requests) and below
    every shape's vocabulary (the weights are random: only the length matters)."""
    return [1000 + (7919 * (i + 1) + 104729 * index) % 30000 for i in range(tokens)]


def cmd_bench(args) -> int:
    stream_generate(args.port, "Say hello.", args.warmup_tokens, args.timeout)  # first calls compile kernels
    prompts = [long_prompt(i, args.prompt_tokens) if args.prompt_tokens else PROMPTS[i % len(PROMPTS)]
               for i in range(args.prompts)]
    requests = [stream_generate(args.port, prompt, args.max_tokens, args.timeout) for prompt in prompts]
    decode_ms = sum(r["decode_ms"] for r in requests)
    later_tokens = sum(r["tokens"] - 1 for r in requests)  # the first token comes from prefill
    report = {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "requests": requests,
              "ms_per_token": decode_ms / later_tokens, "gpu_memory_serving": gpu_memory_mib()}
    steps = [r["verify_steps"] for r in requests]
    if all(s for s in steps):
        report["ms_per_step"] = decode_ms / sum(steps)
        report["accept_length"] = sum(r["tokens"] for r in requests) / sum(steps)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


# --------------------------------------------------------------------------------------------- summary


def cmd_run_info(args) -> int:
    record = {"started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "stages": args.stages, "gpu": gpu_memory_mib(), "draft_backend": args.draft_backend,
              "tree_topk": TREE_TOPK, "mem_fraction_static": args.mem_fraction, "prompts": args.prompts,
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "budget_s": args.budget,
              "port": args.port, "common_flags": args.flags}
    Path(args.dir, "run.json").write_text(json.dumps(record, indent=1))
    return 0


def cmd_stage(args) -> int:
    record = {"status": args.status, "reason": args.reason, "startup_s": args.startup_s, "flags": args.flags}
    Path(args.dir, f"{args.stage}.stage.json").write_text(json.dumps(record, indent=1))
    return 0


GB = r"([0-9.]+) GB"
MEMORY_PATTERNS = {
    "weights": re.compile(r"Load weight end\..*type=(\w+),.*avail mem=" + GB + r", mem usage=" + GB),
    "kv_pool": re.compile(r"KV Cache is allocated\. dtype: [\w.]+, #tokens: (\d+), "
                          r"(?:K size: " + GB + r", V size: " + GB + r"|KV size: " + GB + ")"),
    "swa_pool": re.compile(r"SWAKVPool mem usage: " + GB + r", swa size: (\d+), full size: (\d+)"),
    "graphs": re.compile(r"Capture (target|draft) (?:decode|verify) .*graph end\. elapsed=([0-9.]+) s, mem usage="
                         + GB + r", avail mem=" + GB),
    "ready": re.compile(r"max_total_num_tokens=(\d+),.*available_gpu_mem=" + GB),
}


def parse_memory(log: str) -> dict:
    """SGLang's startup lines -> weights per model, KV pools, CUDA-graph memory, memory left once ready (GB)."""
    found: dict = {"weights_gb": {}, "kv_pools": [], "swa_pools": [], "graph_gb": {}}
    for line in log.splitlines():
        if m := MEMORY_PATTERNS["weights"].search(line):
            role = "draft" if "DFlash" in m.group(1) else "target"
            found["weights_gb"][role] = float(m.group(3))
            found[f"{role}_type"] = m.group(1)
        elif m := MEMORY_PATTERNS["kv_pool"].search(line):
            k, v, kv = m.group(2), m.group(3), m.group(4)
            size = float(kv) if kv is not None else float(k) + float(v)
            found["kv_pools"].append({"tokens": int(m.group(1)), "gb": size})
        elif m := MEMORY_PATTERNS["swa_pool"].search(line):
            found["swa_pools"].append({"gb": float(m.group(1)), "swa_tokens": int(m.group(2)),
                                       "full_tokens": int(m.group(3))})
        elif m := MEMORY_PATTERNS["graphs"].search(line):
            found["graph_gb"][m.group(1)] = float(m.group(3))
            found.setdefault("graph_capture_s", {})[m.group(1)] = float(m.group(2))
        elif m := MEMORY_PATTERNS["ready"].search(line):
            found["max_total_num_tokens"] = int(m.group(1))
            found["available_after_startup_gb"] = float(m.group(2))
    # Each sub-pool of an SWA pool logs its own allocation line, so the lines alone add up to the whole KV cache.
    found["kv_total_gb"] = round(sum(p["gb"] for p in found["kv_pools"]), 2)
    return found


def step_timing_means(log: str, skip_first: bool = True) -> dict | None:
    """Step-weighted means of the bs=1 timing lines; the first line (warm-up steps) dropped when others exist.

    The lines have the same fields in both modes; in tree mode `draft` ends after the tree build (drafter forward
    + top-k head + build_draft_tree) and `rest` is acceptance, slot reorder, feature gather and context write."""
    lines = [p for p in parse_log(log) if p["bs"] == 1]
    if skip_first and len(lines) > 1:
        lines = lines[1:]
    steps = sum(p["steps"] for p in lines)
    if not steps:
        return None
    means = {key: sum(p[key] * p["steps"] for p in lines) / steps
             for key in ("draft_ms", "verify_ms", "rest_ms", "step_ms")}
    return {"lines": len(lines), "steps": steps, **means}


def tree_mode_seen(log: str) -> dict | None:
    """What the worker said it serves in tree mode ({budget, topk}), None for a chain."""
    m = TREE_ON.search(log)
    return {"budget": int(m.group(1)), "topk": int(m.group(2))} if m else None


def stage_names(out: Path, run: dict) -> list[str]:
    """The stages the run asked for, plus any other stage with files in `out`, in STAGES order."""
    asked = set(run.get("stages") or STAGES)
    return [name for name in STAGES
            if name in asked or any((out / f"{name}{ext}").exists() for ext in (".stage.json", ".log", ".json"))]


def summarize(out: Path) -> dict:
    config_path = out / "run.json"
    run = json.loads(config_path.read_text()) if config_path.exists() else {}
    shape = run.get("shape", DEFAULT_SHAPE)
    stages = {}
    for name in stage_names(out, run):
        record_path = out / f"{name}.stage.json"
        stage = json.loads(record_path.read_text()) if record_path.exists() else {"status": "not run"}
        stage.update(STAGES[name])
        if stage["mode"] == "tree":
            stage["tree_topk"] = TREE_TOPK
        log_path = out / f"{name}.log"
        if log_path.exists():
            log = log_path.read_text(errors="replace")
            stage["memory"] = parse_memory(log)
            if stage["mode"] != "ar":
                stage["served_by_ours"] = SERVING_OURS in log
                stage["step_timing_on"] = TIMING_ON in log
                stage["tree_mode_seen"] = tree_mode_seen(log)
                stage["step_timing"] = step_timing_means(log)
        bench_path = out / f"{name}.json"
        if bench_path.exists():
            stage["client"] = json.loads(bench_path.read_text())
        profile_path = out / f"{name}.profile.json"
        if profile_path.exists():
            stage["profile"] = step_profile(json.loads(profile_path.read_text()), stage["mode"])
        stages[name] = stage
    derive(stages, shape)
    date = run.get("started_utc", datetime.now(timezone.utc).isoformat())[:10]
    return {"date": date, "shape": shape, "published_tau_b16": PUBLISHED_TAU_B16.get(shape, {}),
            "bars": BARS.get(shape), "run": run, "stages": stages}


def step_profile(summary: dict, mode: str) -> dict | None:
    """From profile_step.py's summary (shape.sh --profile), one decode step's figures: our worker's decode range
    for a DFLASH stage, for AR SGLang's scheduler steps that replayed a decode graph (not the eager prefill); None
    when it has no such steps."""
    part = summary.get("scheduler_graph_step", {}) if mode == "ar" else summary
    if not part.get("steps"):
        return None
    keys = ("steps", "host_ms_per_step_median", "gpu_span_ms_per_step_median", "gpu_kernel_us_per_step",
            "top_kernels_by_gpu_time")
    return {key: part.get(key) for key in keys}


def stage_bar(stage: dict, shape: str) -> float | None:
    bars = BARS.get(shape)
    if not bars or stage["mode"] == "ar":
        return None
    if stage["mode"] == "tree":
        return bars["tree"] if stage["tree_budget"] <= bars["tree_max_budget"] else None
    return bars["chain"]


def derive(stages: dict, shape: str = DEFAULT_SHAPE) -> None:
    """Per DFLASH stage, against t_AR (AR ms/token at c1): our GPU step / t_AR and the client's end-to-end step /
    t_AR (each the acceptance length at which the step breaks even with AR), the shape's bar on them, the
    break-even acceptance of draft + verify alone, and at B = 16 the bound at each published tau."""
    ar = stages.get("ar", {})
    t_ar = ar.get("client", {}).get("ms_per_token") if ar.get("status") == "ok" else None
    published = PUBLISHED_TAU_B16.get(shape, {})
    for stage in stages.values():
        for key in ("step_ratio_gpu", "step_ratio_e2e", "break_even_tau_gpu", "break_even_tau_e2e", "bar",
                    "bar_met_gpu", "bar_met_e2e", "bounds"):
            stage.pop(key, None)
        if stage["mode"] == "ar":
            continue
        bar = stage_bar(stage, shape)
        if bar is not None:
            stage["bar"] = bar
        timing, client = stage.get("step_timing"), stage.get("client", {})
        if not t_ar:
            continue
        if timing:
            stage["step_ratio_gpu"] = timing["step_ms"] / t_ar
            stage["break_even_tau_gpu"] = (timing["draft_ms"] + timing["verify_ms"]) / t_ar
        if client.get("ms_per_step"):
            stage["step_ratio_e2e"] = client["ms_per_step"] / t_ar
        if bar is not None:
            for kind in ("gpu", "e2e"):
                if f"step_ratio_{kind}" in stage:
                    stage[f"bar_met_{kind}"] = stage[f"step_ratio_{kind}"] <= bar
        if stage["mode"] == "chain" and stage["block"] == 16 and published:
            stage["bounds"] = {
                name: {"tau": tau,
                       "gpu": tau * t_ar / (timing["draft_ms"] + timing["verify_ms"]) if timing else None,
                       "e2e": tau * t_ar / client["ms_per_step"] if client.get("ms_per_step") else None}
                for name, tau in published.items()}


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mode_label(stage: dict) -> str:
    if stage["mode"] == "ar":
        return "AR"
    if stage["mode"] == "tree":
        label = f"tree N={stage['tree_budget']} top-{stage.get('tree_topk', TREE_TOPK)} B={stage['block']}"
    else:
        label = f"chain B={stage['block']}"
    quantized = stage.get("draft_quantization")
    label += f", {quantized} drafter" if quantized else ""
    label += f", {stage['draft_head']} head" if stage.get("draft_head") else ""
    return label + (", split-KV verify" if stage.get("verify_splitkv") else "")


def verdict(met) -> str:
    return "-" if met is None else ("met" if met else "NOT met")


def table_rows(summary: dict) -> list[tuple]:
    rows = [("stage", "mode", "status", "startup s", "weights GB (target+draft)", "KV GB", "graphs GB",
             "smi used GiB", "ms/token", "e2e ms/step", "tokens/step", "draft ms", "verify ms", "rest ms",
             "step ms", "step/AR (GPU)", "step/AR (e2e)", "bar")]
    for name, stage in summary["stages"].items():
        memory, client, timing = stage.get("memory", {}), stage.get("client", {}), stage.get("step_timing") or {}
        weights = memory.get("weights_gb", {})
        smi = (client.get("gpu_memory_serving") or {}).get("used_mib")
        status = stage["status"] + (f" ({stage['reason']})" if stage.get("reason") else "")
        bar = stage.get("bar")
        rows.append((
            name, mode_label(stage), status, fmt(stage.get("startup_s"), 0),
            "+".join(fmt(weights.get(k)) for k in ("target", "draft") if k in weights) or "-",
            fmt(memory.get("kv_total_gb") if memory.get("kv_pools") else None),
            fmt(sum(memory.get("graph_gb", {}).values()) if memory.get("graph_gb") else None),
            fmt(smi / 1024 if smi else None, 1), fmt(client.get("ms_per_token")), fmt(client.get("ms_per_step")),
            fmt(client.get("accept_length")), fmt(timing.get("draft_ms")), fmt(timing.get("verify_ms")),
            fmt(timing.get("rest_ms")), fmt(timing.get("step_ms")), fmt(stage.get("step_ratio_gpu"), 3),
            fmt(stage.get("step_ratio_e2e"), 3), "-" if bar is None else f"<= {bar:.2f}x",
        ))
    return rows


def bar_lines(summary: dict) -> list[str]:
    """One line per DFLASH stage with a bar: our step against the AR step, both clocks, and whether it holds."""
    bars = summary.get("bars")
    if not bars:
        return []
    ar = summary["stages"].get("ar", {})
    t_ar = ar.get("client", {}).get("ms_per_token") if ar.get("status") == "ok" else None
    lines = [f"{summary['shape']} bars ({bars['source']}): chain step <= {bars['chain']:.2f}x an AR decode step, "
             f"tree (N <= {bars['tree_max_budget']}) <= {bars['tree']:.2f}x; t_AR = AR ms/token at c1 = {fmt(t_ar)}"]
    for name, stage in summary["stages"].items():
        if "bar" not in stage:
            continue
        timing, client = stage.get("step_timing") or {}, stage.get("client", {})
        if not t_ar or not (timing or client.get("ms_per_step")):
            lines.append(f"  {name} ({mode_label(stage)}): not measured ({stage['status']}"
                         f"{', no AR reference' if not t_ar else ''})")
            continue
        lines.append(
            f"  {name} ({mode_label(stage)}): GPU step {fmt(timing.get('step_ms'))} ms / {fmt(t_ar)} = "
            f"{fmt(stage.get('step_ratio_gpu'), 3)}x [{verdict(stage.get('bar_met_gpu'))}]; end-to-end step "
            f"{fmt(client.get('ms_per_step'))} ms / {fmt(t_ar)} = {fmt(stage.get('step_ratio_e2e'), 3)}x "
            f"[{verdict(stage.get('bar_met_e2e'))}]; bar <= {stage['bar']:.2f}x")
    return lines


def bound_lines(summary: dict) -> list[str]:
    if not summary.get("published_tau_b16"):
        return []
    stage = summary["stages"].get("b16", {})
    ar = summary["stages"].get("ar", {}).get("client", {}).get("ms_per_token")
    if "bounds" not in stage:
        return ["bound: needs the ar and b16 stages measured"]
    timing = stage.get("step_timing") or {}
    lines = []
    for name, bound in stage["bounds"].items():
        lines.append(
            f"bound at B=16, {name} tau {bound['tau']}: tau*t_AR/(t_verify+t_draft) = {bound['tau']} * {ar:.2f} / "
            f"({fmt(timing.get('verify_ms'))} + {fmt(timing.get('draft_ms'))}) = {fmt(bound['gpu'])}x; "
            f"with our end-to-end step: {fmt(bound['e2e'])}x")
    return lines


def warnings(summary: dict) -> list[str]:
    """Served stages whose log lacks what the numbers rest on: our worker, its timing lines, tree mode as asked."""
    found = []
    for name, stage in summary["stages"].items():
        if stage["mode"] == "ar" or stage["status"] != "ok":
            continue
        if not stage.get("served_by_ours"):
            found.append(f"warning: {name} served but our worker line is missing from {name}.log")
        elif not stage.get("step_timing"):
            found.append(f"warning: {name} served but no bs=1 step timing line is in {name}.log")
        if stage["mode"] == "tree":
            seen, asked = stage.get("tree_mode_seen"), {"budget": stage["tree_budget"], "topk": stage["tree_topk"]}
            if seen != asked:
                found.append(f"warning: {name} asked for tree mode {asked}, its log says {seen}")
    return found


def cmd_summarize(args) -> int:
    out = Path(args.dir)
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.print:
        rows = table_rows(summary)
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        print()
        for row in rows:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        print()
        for line in bar_lines(summary) + bound_lines(summary):
            print(line)
        print("step/AR: our step over one AR decode step (AR ms/token at c1), GPU = our worker's CUDA-event step,"
              " e2e = the client's ms/step; either is the acceptance length at which the step breaks even with AR.")
        for line in warnings(summary):
            print(line)
        failed = [name for name, stage in summary["stages"].items() if stage["status"] == "failed"]
        if failed:
            print(f"failed stages: {', '.join(failed)} (see their logs)")
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--shape", choices=SHAPES, default=DEFAULT_SHAPE)
    p.add_argument("--out", required=True)
    p.add_argument("--blocks", type=int, nargs="+", default=list(CHAIN_BLOCKS))
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("bench")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=0, help="prompts of this many token ids (0: short texts)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("run-info")
    p.add_argument("--dir", required=True)
    p.add_argument("--shape", choices=SHAPES, default=DEFAULT_SHAPE)
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--draft-backend", required=True)
    p.add_argument("--mem-fraction", type=float, required=True)
    p.add_argument("--prompts", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, default=0)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--port", type=int)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[])
    p.set_defaults(func=cmd_run_info)
    p = sub.add_parser("stage")
    p.add_argument("--dir", required=True)
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--status", required=True, choices=["ok", "failed", "skipped"])
    p.add_argument("--reason", default="")
    p.add_argument("--startup-s", type=float)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[])
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("summarize")
    p.add_argument("--dir", required=True)
    p.add_argument("--print", action="store_true", help="print the table, the bars and the bound")
    p.set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

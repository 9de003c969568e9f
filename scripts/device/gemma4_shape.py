"""Python half of scripts/device/gemma4_shape.sh: the Gemma-4-31B-shaped pair, the client, and the summary.

Standard library plus this repository (the GPU box has no package registry). Subcommands:
  prepare   --out DIR --blocks 16 32 64        target + tokenizer, one drafter config per block size, pairs checked
  bench     --port P --out FILE ...            greedy c1 streaming requests: ms/token, ms/step, GPU memory in use
  run-info  --dir D --draft-backend B ...      record the run's settings (run.json)
  stage     --dir D --stage S --status ...     record how a stage went (ok / failed / skipped) and its startup time
  summarize --dir D [--print]                  server logs + bench JSON -> summary.json (and the table)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from dflash_sglang.sglang.step_timing import parse_log

STAGES = {"ar": None, "b16": 16, "b32": 32, "b64": 64}
# Acceptance lengths published for z-lab/gemma-4-31B-it-DFlash (B = 16); notes/dflash.md §4.2: Math500 c1,
# vLLM on a B300, thinking on -- quoted by our brief, the table row itself not read in any stored copy.
PUBLISHED_TAU_B16 = {"math500": 8.59}
SERVED_BY_OURS = "dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker"
TIMING_ON = "dflash_sglang: step timing on"
PROMPTS = ["Explain, step by step, how a harbor lock raises a ship.",
           "Write a long story about a violin found in an attic.",
           "Describe the history of the old map room in detail.",
           "List and explain twenty facts about winter rain."]


# --------------------------------------------------------------------------------------------- setup


def cmd_prepare(args) -> int:
    from dflash_sglang.config import DFlashConfigError, TargetInfo, load_drafter_config, validate_pair
    from dflash_sglang.shapes import write_shape

    target, drafter = write_shape("gemma-4-31b", args.out)
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
    print(json.dumps({"target": str(target), "drafters": drafters}))
    return 1 if problems else 0


# --------------------------------------------------------------------------------------------- client


def stream_generate(port: int, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One greedy streaming /generate: arrival times of the first and last chunks, tokens, verify steps."""
    body = {"text": prompt, "stream": True,
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


def gpu_memory_mib() -> dict | None:
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, used, total = (field.strip() for field in out.splitlines()[0].split(","))
    return {"gpu": name, "used_mib": int(used), "total_mib": int(total)}


def cmd_bench(args) -> int:
    stream_generate(args.port, "Say hello.", args.warmup_tokens, args.timeout)  # first calls compile kernels
    requests = [stream_generate(args.port, PROMPTS[i % len(PROMPTS)], args.max_tokens, args.timeout)
                for i in range(args.prompts)]
    decode_ms = sum(r["decode_ms"] for r in requests)
    later_tokens = sum(r["tokens"] - 1 for r in requests)  # the first token comes from prefill
    report = {"prompts": args.prompts, "max_tokens": args.max_tokens, "requests": requests,
              "ms_per_token": decode_ms / later_tokens, "gpu_memory_serving": gpu_memory_mib()}
    steps = [r["verify_steps"] for r in requests]
    if all(s for s in steps):
        report["ms_per_step"] = decode_ms / sum(steps)
        report["accept_length"] = sum(r["tokens"] for r in requests) / sum(steps)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


# --------------------------------------------------------------------------------------------- summary


def cmd_run_info(args) -> int:
    record = {"started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": gpu_memory_mib(),
              "draft_backend": args.draft_backend, "mem_fraction_static": args.mem_fraction, "prompts": args.prompts,
              "max_tokens": args.max_tokens, "budget_s": args.budget, "common_flags": args.flags}
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
    """Step-weighted means of the bs=1 timing lines; the first line (warm-up steps) dropped when others exist."""
    lines = [p for p in parse_log(log) if p["bs"] == 1]
    if skip_first and len(lines) > 1:
        lines = lines[1:]
    steps = sum(p["steps"] for p in lines)
    if not steps:
        return None
    means = {key: sum(p[key] * p["steps"] for p in lines) / steps
             for key in ("draft_ms", "verify_ms", "rest_ms", "step_ms")}
    return {"lines": len(lines), "steps": steps, **means}


def summarize(out: Path) -> dict:
    stages = {}
    for name, block in STAGES.items():
        record_path = out / f"{name}.stage.json"
        stage = json.loads(record_path.read_text()) if record_path.exists() else {"status": "not run"}
        stage["block"] = block
        log_path = out / f"{name}.log"
        if log_path.exists():
            log = log_path.read_text(errors="replace")
            stage["memory"] = parse_memory(log)
            if block is not None:
                stage["served_by_ours"] = SERVED_BY_OURS in log
                stage["step_timing_on"] = TIMING_ON in log
                stage["step_timing"] = step_timing_means(log)
        bench_path = out / f"{name}.json"
        if bench_path.exists():
            stage["client"] = json.loads(bench_path.read_text())
        stages[name] = stage
    derive(stages)
    config_path = out / "run.json"
    run = json.loads(config_path.read_text()) if config_path.exists() else {}
    date = run.get("started_utc", datetime.now(timezone.utc).isoformat())[:10]
    return {"date": date, "published_tau_b16": PUBLISHED_TAU_B16, "run": run, "stages": stages}


def derive(stages: dict) -> None:
    """Per DFLASH stage: break-even acceptance length vs AR; at B = 16 the bound at each published tau."""
    t_ar = stages["ar"].get("client", {}).get("ms_per_token")
    for stage in stages.values():
        for key in ("break_even_tau_gpu", "break_even_tau_e2e", "bounds"):
            stage.pop(key, None)
        timing, client = stage.get("step_timing"), stage.get("client", {})
        if stage["block"] is None or not t_ar:
            continue
        if timing:
            gpu_cost = timing["draft_ms"] + timing["verify_ms"]
            stage["break_even_tau_gpu"] = gpu_cost / t_ar
        if client.get("ms_per_step"):
            stage["break_even_tau_e2e"] = client["ms_per_step"] / t_ar
        if stage["block"] == 16:
            stage["bounds"] = {
                name: {"tau": tau,
                       "gpu": tau * t_ar / (timing["draft_ms"] + timing["verify_ms"]) if timing else None,
                       "e2e": tau * t_ar / client["ms_per_step"] if client.get("ms_per_step") else None}
                for name, tau in PUBLISHED_TAU_B16.items()}


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(summary: dict) -> list[tuple]:
    rows = [("stage", "status", "startup s", "weights GB (target+draft)", "KV GB", "graphs GB", "smi used GiB",
             "ms/token", "e2e ms/step", "draft ms", "verify ms", "rest ms", "step ms", "break-even tau", "note")]
    for name, stage in summary["stages"].items():
        memory, client, timing = stage.get("memory", {}), stage.get("client", {}), stage.get("step_timing") or {}
        weights = memory.get("weights_gb", {})
        smi = (client.get("gpu_memory_serving") or {}).get("used_mib")
        status = stage["status"] + (f" ({stage['reason']})" if stage.get("reason") else "")
        note = "AR reference" if stage["block"] is None else ("published tau" if stage["block"] == 16 else "cost only")
        rows.append((
            name, status, fmt(stage.get("startup_s"), 0),
            "+".join(fmt(weights.get(k)) for k in ("target", "draft") if k in weights) or "-",
            fmt(memory.get("kv_total_gb") if memory.get("kv_pools") else None),
            fmt(sum(memory.get("graph_gb", {}).values()) if memory.get("graph_gb") else None),
            fmt(smi / 1024 if smi else None, 1), fmt(client.get("ms_per_token")), fmt(client.get("ms_per_step")),
            fmt(timing.get("draft_ms")), fmt(timing.get("verify_ms")), fmt(timing.get("rest_ms")),
            fmt(timing.get("step_ms")), fmt(stage.get("break_even_tau_gpu")), note,
        ))
    return rows


def bound_lines(summary: dict) -> list[str]:
    stage = summary["stages"]["b16"]
    ar = summary["stages"]["ar"].get("client", {}).get("ms_per_token")
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
        for line in bound_lines(summary):
            print(line)
        print("B=32 / B=64 rows are cost only: no acceptance length is published for them.")
        for name in ("b16", "b32", "b64"):
            stage = summary["stages"][name]
            if stage["status"] == "ok" and not (stage.get("served_by_ours") and stage.get("step_timing")):
                missing = "our worker line" if not stage.get("served_by_ours") else "any step timing line"
                print(f"warning: {name} served but {missing} is missing from {name}.log")
        failed = [name for name, stage in summary["stages"].items() if stage["status"] == "failed"]
        if failed:
            print(f"failed stages: {', '.join(failed)} (see their logs)")
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("bench")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("run-info")
    p.add_argument("--dir", required=True)
    p.add_argument("--draft-backend", required=True)
    p.add_argument("--mem-fraction", type=float, required=True)
    p.add_argument("--prompts", type=int, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--budget", type=int, required=True)
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
    p.add_argument("--print", action="store_true", help="print the table and the bound")
    p.set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""bench.json of scripts/device/bench.sh -> bench-<date>.{json.xz,md} and its plots, for docs/results/.

    python scripts/bench_report.py out/bench/bench.json --out docs/results/
    python scripts/bench_report.py out/bench/bench.json --no-plots      # the markdown to stdout only (the GPU box)

Every number in the markdown and the plots is read from the JSON by `throughput_rows` / `interleaved_rows` /
`set_rows` / `tree_sweep_rows` / `profile_rows`, so they match it (tests/test_bench_report.py checks the markdown
against the JSON). Plots: tok/s and speedup vs AR against concurrency (the interleaved sweep's medians where it ran,
else the sequential sweep's figures), and with a tree budget sweep, tau and c1 tok/s against the budget. The plots
need matplotlib, which the project does not depend on: install it anywhere outside the shared venv, e.g.
    python -m pip install --target /tmp/dflash-mpl matplotlib && PYTHONPATH=/tmp/dflash-mpl python scripts/...
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import sys
from pathlib import Path

SET_TITLES = {"math500": "MATH-500", "humaneval": "HumanEval", "mtbench": "MT-Bench", "gsm8k": "GSM8K"}
TITLES = {"ar": "AR", "builtin": "builtin DFLASH", "ours": "ours (chain)", "ours-tree": "ours (tree)",
          "ours-adaptive": "ours (tree, adaptive)"}
PROFILE_COLUMNS = (("steps", "d"), ("host_ms_per_step_mean", ".3f"), ("host_ms_per_step_median", ".3f"),
                   ("kernel_launches_per_step", ".1f"), ("graph_launches_per_step", ".1f"),
                   ("host_syncs_per_step", ".2f"))


def title(bench: dict, name: str) -> str:
    """A contender's name in the tables: one of TITLES, or a budget sweep's tree with its node count."""
    budget = bench.get("settings", {}).get("tree_contenders", {}).get(name)
    if name not in TITLES and budget is not None:
        return f"ours (tree, {budget} nodes)"
    return TITLES.get(name, name)


def _levels(contender: dict, stage: str) -> list[dict]:
    run = contender["runs"].get(stage)
    return [] if run is None else [lv for lvs in run["sets"].values() for lv in lvs]


def throughput_rows(bench: dict) -> list[dict]:
    """Per contender and concurrency of the sweep: tok/s, speedups vs AR and vs builtin at the same concurrency,
    TPOT, TTFT, tau, mismatches vs AR with AR's largest top-2 margin among them and how many are not near-ties
    (None where not measured)."""
    by_name = {c["name"]: {lv["concurrency"]: lv for lv in _levels(c, "sweep") if not lv["skipped"]}
               for c in bench["contenders"]}

    def ratio(level: dict, other: str) -> float | None:
        base = by_name.get(other, {}).get(level["concurrency"])
        if base is None or not base["output_tok_s"] or level["output_tok_s"] is None:
            return None
        return level["output_tok_s"] / base["output_tok_s"]

    rows = []
    for contender in bench["contenders"]:
        for level in _levels(contender, "sweep"):
            row = {"contender": contender["name"], "prompt_set": level["prompt_set"],
                   "concurrency": level["concurrency"], "skipped": level["skipped"]}
            if not level["skipped"]:
                row.update(requests=level["requests"], errors=level["errors"], tok_s=level["output_tok_s"],
                           vs_ar=ratio(level, "ar"), vs_builtin=ratio(level, "builtin"),
                           tpot_ms=level["mean_tpot_ms"], ttft_ms=level["mean_ttft_ms"], tau=level["tau"],
                           mismatches=level["mismatches"], checked=level["requests"] - level["errors"]
                           - (level["unchecked"] or 0), max_margin=level.get("mismatch_max_margin"),
                           above_tolerance=level.get("mismatches_above_tolerance"))
            rows.append(row)
    return rows


def request_latency_figures(level: dict, name: str) -> tuple[float | None, float | None]:
    """Medians over a level's complete repeats of `name`'s mean request latency (ms) and of its tail: the repeat's
    duration over what it would take if every request lasted the mean, c at a time (1.00 when all finish
    together; a batch waits for its slowest request). None without per-request latencies."""
    latencies, tails = [], []
    for run in level["runs"]:
        result = run["results"].get(name) if run["complete"] else None
        done = [r["latency"] for r in (result or {}).get("per_request", []) if r.get("error") is None]
        if not done or not result.get("seconds"):
            continue
        mean = statistics.fmean(done)
        latencies.append(1000 * mean)
        waves = max(len(done) / level["concurrency"], 1.0)  # fewer requests than c still run as one wave
        tails.append(result["seconds"] / (mean * waves))
    return (statistics.median(latencies) if latencies else None, statistics.median(tails) if tails else None)


def pooled_ratio(level: dict, name: str, base: str) -> float | None:
    """`name`'s throughput over `base`'s with a level's complete repeats pooled: all output tokens over all the
    seconds they took, one against the other. Beside the median of per-repeat ratios it weighs each repeat by its
    length, so a short repeat that ran fast counts for its duration only. None when no repeat has both."""
    tokens, seconds = {name: 0, base: 0}, {name: 0.0, base: 0.0}
    for run in level["runs"]:
        results = [run["results"].get(n) if run["complete"] else None for n in (name, base)]
        if not all(r and r.get("seconds") and r.get("output_tokens") for r in results):
            continue
        for n, result in zip((name, base), results):
            tokens[n] += result["output_tokens"]
            seconds[n] += result["seconds"]
    if not seconds[name] or not seconds[base]:
        return None
    return (tokens[name] / seconds[name]) / (tokens[base] / seconds[base])


def interleaved_load(report: dict) -> str:
    """What each contender was sent per level and repeat in the interleaved stage (bench --interleave)."""
    rounds, least = report.get("rounds"), report.get("min_requests") or 1
    if not rounds:
        load = "the whole prompt set, c requests in flight at a time"
    elif rounds == 1:
        load = f"one batch of max(c, {least}) prompts"
    else:
        load = (f"max({rounds} x c, {least}) prompts with c in flight at a time (each finished request makes room "
                "for the next)")
    return load + (", from an empty radix cache" if report.get("flush") else "")


def interleaved_rows(bench: dict) -> list[dict]:
    """The interleaved stage (bench --interleave), per contender (in the suite's order) and level it ran at: the
    repeats counted (complete ones) and planned, the medians over them of tok/s, TPOT, TTFT, tau, the mean request
    latency and the tail (`request_latency_figures`), the median, min and max of the per-repeat tok/s ratios to AR
    and to the builtin (None where not paired), the ratio to AR over the repeats pooled (`pooled_ratio`), and
    mismatches vs AR over the repeats; a skipped level is a row with its reason. Empty when the stage left no
    report."""
    report = (bench.get("interleaved") or {}).get("report")
    if not report:
        return []
    order = [c["name"] for c in bench["contenders"] if c["name"] in report["contenders"]]
    rows = []
    for name in order:
        for level in report["levels"]:
            if name not in level["contenders"]:
                continue
            row = {"contender": name, "concurrency": level["concurrency"], "skipped": level["skipped"]}
            if not level["skipped"]:
                entry = level["summary"][name]
                row.update(repeats=level["repeats"], planned=report["repeats"], tok_s=entry["median_tok_s"],
                           tpot_ms=entry["median_tpot_ms"], ttft_ms=entry["median_ttft_ms"], tau=entry["median_tau"],
                           requests=entry["requests"], errors=entry["errors"], mismatches=entry["mismatches"],
                           checked=entry["requests"] - entry["errors"] - (entry["unchecked"] or 0))
                row["latency_ms"], row["tail"] = request_latency_figures(level, name)
                row["vs_ar_pooled"] = pooled_ratio(level, name, "ar") if name != "ar" else None
                for base in ("ar", "builtin"):
                    vs = entry["vs"].get(base) or {}
                    row.update({f"vs_{base}": vs.get("median"), f"vs_{base}_min": vs.get("min"),
                                f"vs_{base}_max": vs.get("max")})
            rows.append(row)
    return rows


def set_rows(bench: dict) -> list[dict]:
    """Per contender: tau on each prompt set of the per-set stage, their unweighted mean, mismatches vs AR, the
    largest AR top-2 margin among them and how many are not near-ties (None where no set has margins)."""
    rows = []
    for contender in bench["contenders"]:
        levels = _levels(contender, "sets")
        done = [lv for lv in levels if not lv["skipped"]]
        if not done:
            continue
        taus = {lv["prompt_set"]: None if lv["skipped"] else lv["tau"] for lv in levels}
        known = [t for t in taus.values() if t is not None]
        checked = [lv for lv in done if lv["mismatches"] is not None]
        margins = [lv["mismatch_max_margin"] for lv in checked if lv.get("mismatch_max_margin") is not None]
        above = [lv["mismatches_above_tolerance"] for lv in checked
                 if lv.get("mismatches_above_tolerance") is not None]
        rows.append({"contender": contender["name"], "tau": taus,
                     "mean_tau": statistics.fmean(known) if len(known) == len(taus) else None,
                     "requests": sum(lv["requests"] - lv["errors"] for lv in done),
                     "mismatches": sum(lv["mismatches"] for lv in checked) if checked else None,
                     "max_margin": max(margins, default=None), "above_tolerance": sum(above) if above else None})
    return rows


def tree_sweep_rows(bench: dict) -> list[dict]:
    """With several tree contenders (bench.sh --tree-budget "8 16 ..."), one row per budget N in increasing order
    and a last one for the chain (N None): tau per prompt set and their mean (`set_rows`), c1 tok/s of the sweep and
    its ratios to the chain's and AR's c1 tok/s. Empty with fewer than two tree contenders or when none ran."""
    trees = bench.get("settings", {}).get("tree_contenders", {})
    if len(trees) < 2 or not any(c["runs"] for c in bench["contenders"] if c["name"] in trees):
        return []
    taus = {r["contender"]: r for r in set_rows(bench)}
    c1 = {r["contender"]: r["tok_s"] for r in throughput_rows(bench) if r["concurrency"] == 1 and not r["skipped"]}

    def ratio(name: str, base: str) -> float | None:
        if c1.get(name) is None or not c1.get(base):
            return None
        return c1[name] / c1[base]

    rows = []
    for name, budget in [*sorted(trees.items(), key=lambda item: item[1]), ("ours", None)]:
        sets = taus.get(name, {})
        rows.append({"contender": name, "budget": budget, "tau": sets.get("tau", {}),
                     "mean_tau": sets.get("mean_tau"), "c1_tok_s": c1.get(name), "vs_chain": ratio(name, "ours"),
                     "vs_ar": ratio(name, "ar")})
    return rows


PROFILE_RANGES = (("scheduler_step", "scheduler step"), (None, "our decode step"))


KERNELS_LISTED = 10  # per profiled run, in the kernels-per-step list under the profile table


def profile_rows(bench: dict) -> list[dict]:
    """bench.sh --profile: per contender, concurrency and profiled range (SGLang's scheduler step, which every server
    has, then our worker's decode step inside it, where there is one), the status and profile_step.py's per-step
    figures (PROFILE_COLUMNS); a run that left no summary is one row of None."""
    rows = []
    for run in bench.get("profiles", []):
        head = {"contender": run["contender"], "concurrency": run["concurrency"], "status": run["status"],
                "reason": run["reason"]}
        summary = run["summary"]
        if not summary:
            rows.append({**head, "range": None, **{key: None for key, _ in PROFILE_COLUMNS}})
            continue
        for key, name in PROFILE_RANGES:
            figures = summary.get(key) if key else summary
            if figures and figures.get("steps"):
                rows.append({**head, "range": name, **{k: figures.get(k) for k, _ in PROFILE_COLUMNS}})
    return rows


def _f(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def _mismatch(bench: dict, contender: str, count: int | None, of: int) -> str:
    if contender == bench.get("reference"):
        return "reference"
    return "-" if count is None else f"{count}/{of}"


def _margins(bench: dict, contender: str, max_margin: float | None, above: int | None) -> str:
    """The two near-tie cells: AR's largest top-2 margin at a mismatch, and how many mismatches are not near-ties."""
    if contender == bench.get("reference"):
        return "reference | reference"
    return f"{_f(max_margin, '.4f')} | {_f(above, 'd')}"


def _where(mismatch: dict) -> str:
    """`id@position`, with ` (margin)` where AR recorded its top-2 margins."""
    margin = mismatch.get("margin")
    return f"{mismatch['id']}@{mismatch['index']}" + ("" if margin is None else f" ({margin:.4f})")


def _stage_settings(bench: dict, stage: str) -> dict:
    for contender in bench["contenders"]:
        if stage in contender["runs"]:
            return contender["runs"][stage]
    return {}


def _ratio_range(low: float | None, high: float | None) -> str:
    return "-" if low is None else f"{low:.2f}..{high:.2f}"


def _interleaved_section(bench: dict) -> list[str]:
    """The interleaved sweep's table (`interleaved_rows`) with its heading and notes; nothing when it did not run."""
    rows = interleaved_rows(bench)
    if not rows:
        return []
    report = bench["interleaved"]["report"]
    out = ["", f"## Interleaved sweep (median of {report['repeats']} repeats, paired ratios)", "",
           "**The figures the bars are judged on.** After every contender's own stages, the servers measured again "
           f"in turn on {SET_TITLES.get(report['prompt_set'], report['prompt_set'])}, {report['max_tokens']} greedy "
           f"tokens per request ({'EOS ignored' if report.get('ignore_eos', True) else 'at most; stopping at EOS'}): "
           f"per concurrency c and repeat, {interleaved_load(report)} on each "
           "contender, the same prompts for all, in an order rotated every repeat. The machine's speed drifts over "
           "tens of seconds, so the sequential sweep above compares runs a minute apart; here each ratio is of two "
           "runs seconds apart in the same repeat (paired), and the table gives its median over the repeats with its "
           "min..max. tok/s, TPOT, TTFT and tau are medians over the repeats; repeats: those every contender of "
           "the level completed, of those planned (a level stops repeating when the next repeat would not fit its "
           "share of the stage's time). Latency: a request's, mean over the repeat's requests. Tail: the repeat's "
           "duration over what it would take if every request lasted that mean, c at a time; 1.00 when all finish "
           "together. A speculative server's requests finish at different steps, so a batch of them waits for its "
           "slowest, and tok/s can lose to AR's while every request's mean latency wins. Mismatches: against AR's "
           "outputs in this stage. vs AR pooled: all the level's output tokens over all their seconds, against AR's "
           "the same way (each repeat weighs by its duration); when it and the median disagree on a side of 1.0x, "
           "the level's repeats do not settle it.", "",
           "| contender | conc | repeats | tok/s | vs AR | vs AR min..max | vs AR pooled | vs builtin "
           "| vs builtin min..max | TPOT ms | TTFT ms | latency ms | tail | tau | mismatches vs AR |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = title(bench, r["contender"])
        if r["skipped"]:
            out.append(f"| {name} | {r['concurrency']} | skipped: {r['skipped']} | | | | | | | | | | | | |")
            continue
        out.append(f"| {name} | {r['concurrency']} | {r['repeats']}/{r['planned']} | {_f(r['tok_s'], '.1f')} | "
                   f"{_f(r['vs_ar'], '.2f', 'x')} | {_ratio_range(r['vs_ar_min'], r['vs_ar_max'])} | "
                   f"{_f(r['vs_ar_pooled'], '.3f', 'x')} | {_f(r['vs_builtin'], '.2f', 'x')} | "
                   f"{_ratio_range(r['vs_builtin_min'], r['vs_builtin_max'])} | "
                   f"{_f(r['tpot_ms'], '.2f')} | {_f(r['ttft_ms'], '.1f')} | {_f(r['latency_ms'], '.0f')} | "
                   f"{_f(r['tail'], '.2f')} | {_f(r['tau'], '.2f')} | "
                   f"{_mismatch(bench, r['contender'], r['mismatches'], r['checked'])} |")
    notes = [f"- c{level['concurrency']}: {level['stopped']}" for level in report["levels"] if level.get("stopped")]
    notes += [f"- c{level['concurrency']}: {dropped} incomplete repeat(s) left out (stopped at the time limit)"
              for level in report["levels"] if (dropped := sum(not run["complete"] for run in level["runs"]))]
    if notes:
        out += ["", "Repeats cut short:", ""] + notes
    refused = [f"- {title(bench, name)}, c{level['concurrency']} repeat {run['repeat']}: {error}"
               for level in report["levels"] for run in level["runs"]
               for name, error in run.get("flush_errors", {}).items()]
    if refused:
        out += ["", "Runs that kept the server's radix cache (its flush was refused):", ""] + refused
    return out


def prefill_graphs_note(server_flags: str | None) -> str:
    """Whether the servers captured SGLang's prefill CUDA graphs (bench.sh --prefill-graphs), from their flags."""
    if server_flags is None:
        return ""
    return "; prefill CUDA graphs " + ("off" if "--disable-prefill-cuda-graph" in server_flags.split() else "on")


def _throughput_section(bench: dict, sweep: dict) -> list[str]:
    """The sequential sweep's table, or one line saying it was not run (every contender's budget went to its
    other stages)."""
    rows = throughput_rows(bench)
    if not rows:
        return ["", "## Throughput", "", "Not run: no contender had time left for the sequential sweep in its "
                "budget (bench.sh --budget); the interleaved sweep below measured every contender."]
    tolerance = bench.get("near_tie_tolerance")
    out = ["", f"## Throughput: {', '.join(SET_TITLES.get(n, n) for n in sweep.get('sets', {}))}, "
           f"{sweep.get('max_tokens')} greedy tokens per request (EOS ignored)", "",
           "Speedups are tok/s ratios at the same concurrency"
           + (" of runs made one after another, a minute or more apart: the machine's drift between them is in "
              "the ratio (the interleaved sweep below pairs the runs)" if interleaved_rows(bench) else "")
           + ". Mismatches: outputs that differ from AR's for the "
           "same prompt (bf16: verify- and decode-shaped kernels may round a near-tie differently). Max margin: "
           "AR's top-2 logprob margin at the first differing position, the largest over the mismatches (inf: AR "
           f"had ended there); not near-ties: mismatches whose margin is not below {_f(tolerance, 'g')} (the "
           "near-tie tolerance of docs/reliability.md) or unknown; `-`: nothing to show (no mismatch, or AR "
           "recorded no margins).", "",
           "| contender | conc | requests | tok/s | vs AR | vs builtin | TPOT ms | TTFT ms | tau | mismatches vs AR "
           "| max margin | not near-ties |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = title(bench, r["contender"])
        if r["skipped"]:
            out.append(f"| {name} | {r['concurrency']} | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        mismatch = _mismatch(bench, r["contender"], r["mismatches"], r["checked"])
        requests = f"{r['requests']}" + (f" ({r['errors']} failed)" if r["errors"] else "")
        out.append(f"| {name} | {r['concurrency']} | {requests} | {_f(r['tok_s'], '.1f')} | "
                   f"{_f(r['vs_ar'], '.2f', 'x')} | {_f(r['vs_builtin'], '.2f', 'x')} | {_f(r['tpot_ms'], '.2f')} | "
                   f"{_f(r['ttft_ms'], '.1f')} | {_f(r['tau'], '.2f')} | {mismatch} | "
                   f"{_margins(bench, r['contender'], r['max_margin'], r['above_tolerance'])} |")
    return out


def _prefill_section(bench: dict) -> list[str]:
    """Each server's prefill batches over the whole run, from its log (bench.prefill_batches)."""
    counted = [(c["name"], c["prefills"]) for c in bench["contenders"] if c.get("prefills")]
    if not counted:
        return []
    out = ["", "## Prefill batches per server (whole run, from its log)", "",
           "A prefill batch is a scheduler step with no decoding in it. AR's requests finish together when EOS is "
           "ignored, so they prefill together; a speculative server's finish on different steps and prefill one by "
           "one. Eager: no prefill CUDA graph (graphs off, or a batch SGLang would pad more than 2x, e.g. one "
           "token: a prompt found whole in the radix cache).", "",
           "| server | prefill batches | of one request | eager | of one token |", "|---|---:|---:|---:|---:|"]
    out += [f"| {title(bench, name)} | {p['batches']} | {p['single_request']} | {p['eager']} | {p['one_token']} |"
            for name, p in counted]
    return out


def markdown(bench: dict) -> str:
    s = bench.get("settings", {})
    v = bench.get("versions", {})
    sweep, sets_run = _stage_settings(bench, "sweep"), _stage_settings(bench, "sets")
    out = [f"# Side-by-side benchmark, {bench['date']} ({bench.get('gpu', 'unknown GPU')})", ""]
    out.append(f"Target `{s.get('target')}`, drafter `{s.get('drafter')}` (block {s.get('block_size')}, "
               f"draft attention {s.get('draft_backend')}), {s.get('dtype')}, one server per contender, measured one "
               f"at a time" + (", then in turn (interleaved sweep)" if interleaved_rows(bench) else "")
               + prefill_graphs_note(s.get("server_flags"))
               + ("; each server runs its largest level's requests at once (`--max-running-requests`; SGLang caps a "
                  "speculative server at 48 unless told)" if s.get("max_running_requests") else "")
               + (f"; our servers with `{s['ours_flags']}`" if s.get("ours_flags") else "")
               + (f"; every server (AR's too) with `{s['all_flags']}`" if s.get("all_flags") else "")
               + (f"; the speculative servers (the builtin's and ours, not AR) with `{s['spec_flags']}`"
                  if s.get("spec_flags") else "")
               + ". Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    out += _throughput_section(bench, sweep)
    out += _interleaved_section(bench)
    out += _prefill_section(bench)
    rows = set_rows(bench)
    if rows:
        names = list(dict.fromkeys(name for r in rows for name in r["tau"]))
        out += ["", f"## Acceptance length tau per prompt set: concurrency 1, first {sets_run.get('limit')} "
                    f"prompts of each, up to {sets_run.get('max_tokens')} tokens, stopping at EOS", "",
                "tau = completion tokens / verify steps (bonus token included), mean over requests; `mean` is the "
                "unweighted mean of the sets.", "",
                "| contender | " + " | ".join(SET_TITLES.get(n, n) for n in names)
                + " | mean | mismatches vs AR | max margin | not near-ties |",
                "|---|" + "---:|" * (len(names) + 4)]
        for r in rows:
            mismatch = _mismatch(bench, r["contender"], r["mismatches"], r["requests"])
            out.append(f"| {title(bench, r['contender'])} | "
                       + " | ".join(_f(r["tau"].get(n), ".2f") for n in names)
                       + f" | {_f(r['mean_tau'], '.2f')} | {mismatch} | "
                       f"{_margins(bench, r['contender'], r['max_margin'], r['above_tolerance'])} |")
    sweep_rows = tree_sweep_rows(bench)
    if sweep_rows:
        names = list(dict.fromkeys(name for r in sweep_rows for name in r["tau"])) or s.get("sets", [])
        topk = s.get("tree_topk")
        out += ["", f"## Tree budget sweep: N draft nodes (top-k {topk}), tau per prompt set and c1 tok/s", "",
                "tau as in the per-set table (concurrency 1, stopping at EOS); c1 tok/s from the throughput sweep's "
                "concurrency-1 level (same prompts for every contender); speedups are c1 tok/s ratios to ours "
                "(chain) and AR. The last row is the chain itself.", "",
                "| N | " + " | ".join(SET_TITLES.get(n, n) for n in names)
                + " | mean tau | c1 tok/s | vs chain | vs AR |",
                "|---:|" + "---:|" * (len(names) + 4)]
        for r in sweep_rows:
            out.append(f"| {'chain' if r['budget'] is None else r['budget']} | "
                       + " | ".join(_f(r["tau"].get(n), ".2f") for n in names)
                       + f" | {_f(r['mean_tau'], '.2f')} | {_f(r['c1_tok_s'], '.1f')} | "
                       f"{_f(r['vs_chain'], '.2f', 'x')} | {_f(r['vs_ar'], '.2f', 'x')} |")
    prof_rows = profile_rows(bench)
    if prof_rows:
        out += ["", "## Per-step host cost (scripts/device/profile_step.py inside the server)", "",
                "Inside each `scheduler.run_batch` range (SGLang's scheduler step: every server has it) and each "
                "`dflash_sglang.decode` range (our worker's step, inside the former) of SGLang's torch profiler "
                "trace (CPU + GPU activities, no Python stacks, no shapes): host time per step, CUDA kernel "
                "launches, CUDA graph replays and host synchronizations (stream/device/event synchronize, blocking "
                "memcpy). Profiled: ours (chain) at each profile concurrency; AR, the builtin and the tree "
                "contender with the best c1 tok/s at the first.", "",
                "| contender | conc | range | steps | host ms/step (mean) | host ms/step (median) "
                "| kernel launches/step | graph replays/step | host syncs/step |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in prof_rows:
            name = title(bench, r["contender"])
            if r["status"] != "ok" or r["range"] is None:
                out.append(f"| {name} | {r['concurrency']} | {r['status']}: {r['reason']} | | | | | | |")
                continue
            out.append(f"| {name} | {r['concurrency']} | {r['range']} | "
                       + " | ".join(_f(r[key], spec) for key, spec in PROFILE_COLUMNS) + " |")
        kernel_lines = [
            f"- {title(bench, run['contender'])}, c{run['concurrency']}: "
            + ", ".join(f"`{k['kernel'][:60]}` x{k['launches_per_step']:.1f}" for k in kernels[:KERNELS_LISTED])
            for run in bench.get("profiles", [])
            if (kernels := ((run["summary"] or {}).get("scheduler_step") or {}).get("top_kernels_by_launches"))]
        if kernel_lines:
            out += ["", f"Kernels launched per scheduler step, most launched first (top {KERNELS_LISTED}):", ""]
            out += kernel_lines
    not_run = [f"- {title(bench, c['name'])}: {c['status']}: {c['reason']}" for c in bench["contenders"]
               if c["status"] != "ok"]
    stage = bench.get("interleaved")
    if stage and stage["status"] != "ok":
        not_run.append(f"- interleaved sweep: {stage['status']}: {stage['reason']}")
    if not_run:
        out += ["", "## Not run", ""] + not_run
    details = []
    for c in bench["contenders"]:
        for stage, run in c["runs"].items():
            for lv in (lv for lvs in run["sets"].values() for lv in lvs):
                if lv.get("mismatched"):
                    where = ", ".join(_where(m) for m in lv["mismatched"])
                    details.append(f"- {title(bench, c['name'])}, {stage} {lv['prompt_set']} "
                                   f"c={lv['concurrency']}: {where}")
    report = (bench.get("interleaved") or {}).get("report") or {"levels": []}
    for level in report["levels"]:
        for run in level["runs"]:
            for name, lv in run["results"].items():
                if lv.get("mismatched"):
                    where = ", ".join(_where(m) for m in lv["mismatched"])
                    details.append(f"- {title(bench, name)}, interleaved c={level['concurrency']} repeat "
                                   f"{run['repeat']}: {where}")
    if details:
        out += ["", "## Mismatches (prompt id @ first differing output position; AR's top-2 logprob margin there)",
                ""] + details
    stem = f"bench-{bench['date']}"
    out += ["", f"Raw figures: [{stem}.json.xz]({stem}.json.xz) (xz-compressed JSON).", "",
            f"![output tok/s vs concurrency]({stem}-toks.png) ![speedup vs AR]({stem}-speedup.png)"
            + (f" ![tau and c1 tok/s vs tree budget]({stem}-tree-budget.png)" if sweep_rows else "")]
    return "\n".join(out) + "\n"


def plot_rows(bench: dict) -> tuple[list[dict], str]:
    """The points of the tok/s and speedup plots and where they come from: the interleaved sweep's medians (AR's
    speedup is the dashed line at 1) where any level of it was counted, else the sequential sweep's figures."""
    interleaved = [r for r in interleaved_rows(bench) if not r["skipped"] and r["repeats"]]
    if interleaved:
        return interleaved, "interleaved medians"
    return [r for r in throughput_rows(bench) if not r["skipped"]], "sequential sweep"


def plot(bench: dict, out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is needed for the plots (see this script's docstring), or pass --no-plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, source = plot_rows(bench)
    paths = []
    for key, ylabel, name in (("tok_s", "output tok/s", "toks"), ("vs_ar", "speedup vs AR (tok/s ratio)", "speedup")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for contender in dict.fromkeys(r["contender"] for r in rows):
            points = [(r["concurrency"], r[key]) for r in rows if r["contender"] == contender and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=title(bench, contender))
        if key == "vs_ar":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        concurrencies = sorted({r["concurrency"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs concurrency ({source})\n{bench.get('gpu', '')} {bench['date']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}-{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    sweep = tree_sweep_rows(bench)
    if sweep:
        paths.append(_plot_tree_sweep(plt, bench, sweep, out_dir / f"{stem}-tree-budget.png"))
    return paths


def _plot_tree_sweep(plt, bench: dict, rows: list[dict], path: Path) -> Path:
    """Mean tau and c1 tok/s against the tree budget N, the chain (and AR for tok/s) as dashed lines."""
    trees = [r for r in rows if r["budget"] is not None]
    chain = next(r for r in rows if r["budget"] is None)
    ar_c1 = next((r["tok_s"] for r in throughput_rows(bench)
                  if r["contender"] == "ar" and r["concurrency"] == 1 and not r["skipped"]), None)
    fig, (tau_ax, toks_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    panels = ((tau_ax, "mean_tau", "mean tau over the prompt sets", [("chain", chain["mean_tau"])]),
              (toks_ax, "c1_tok_s", "output tok/s at concurrency 1", [("chain", chain["c1_tok_s"]), ("AR", ar_c1)]))
    for ax, key, ylabel, lines in panels:
        points = [(r["budget"], r[key]) for r in trees if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label="ours (tree)")
        for (label, value), color in zip(lines, ("tab:green", "grey")):
            if value is not None:
                ax.axhline(value, color=color, linewidth=0.8, linestyle="--", label=label)
        budgets = [r["budget"] for r in trees]
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.set_xlabel("tree budget N (draft nodes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"tree budget sweep, {bench.get('gpu', '')} {bench['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_bench(path: Path) -> dict:
    """A bench.json, or the xz-compressed copy this script commits (bench-<date>.json.xz)."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", help="bench.sh's bench.json, or a committed bench-<date>.json.xz")
    parser.add_argument("--out", default=None,
                        help="folder for bench-<date>.{json.xz,md,-toks.png,-speedup.png,-tree-budget.png}")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    bench = load_bench(Path(args.bench_json))
    text = markdown(bench)
    print(text)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"bench-{bench['date']}"
        (out_dir / f"{stem}.md").write_text(text)
        # Compressed: a run's JSON holds every request (1-2.4 MB; ~16x smaller in xz), and each device command
        # carries the whole working tree within 64 MiB.
        raw = out_dir / f"{stem}.json.xz"
        if Path(args.bench_json).resolve() != raw.resolve():
            with lzma.open(raw, "wt", preset=9) as f:
                f.write(json.dumps(bench, indent=1) + "\n")
        written = [] if args.no_plots else plot(bench, out_dir, stem)
        print("wrote " + ", ".join(str(p) for p in [out_dir / f"{stem}.md", raw, *written]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

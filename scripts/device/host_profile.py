"""Host time per output token, by Python function, of a live SGLang server under load (stack samples).

    python3 scripts/device/host_profile.py --port P --samples DIR --out OUT.json [--concurrency 1 32]
                                           [--rounds 3] [--max-tokens 256] [--label NAME]
    python3 scripts/device/host_profile.py --report OUT.json [OUT.json ...]      # the table again, side by side

The server runs with scripts/device/host_sampler_plugin.py (DFLASH_HOST_SAMPLES=DIR). Per concurrency c: c
workers each send `rounds` greedy /generate requests one after another (max tokens, EOS ignored); the sampler's
cumulative seconds per stack are read before and after (each file rewritten every 2 s: the reads wait for a fresh
one), and the difference is the window's. Figures are per output token, so contenders that emit different tokens
per step compare directly: microseconds of the scheduler's main thread per token in each function (inclusive: the
function or anything it called; self: the function itself), the share of the time requests were in flight that it
was busy (not waiting on its sockets), and the timed functions' calls and exact host time (DFLASH_HOST_TIMED).
Writes OUT.json (figures and the window's folded stacks, for a flame graph) and prints a table last.
Standard library only (the GPU box has no package registry).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from profile_step import post  # this folder's scripts run with it on sys.path

MAIN_THREAD = "MainThread"
# Frames the scheduler's main thread sits in while it has nothing to do (zmq receive, --sleep-on-idle's wait).
IDLE_LEAVES = ("poll", "recv", "recv_pyobj", "select", "sleep", "wait", "_wait_for_tstate_lock")
# Leaves where the host waits for the GPU (torch.cuda.Event/Stream.synchronize): busy, but bound by the GPU. Syncs
# made from C (.tolist(), .item()) show as their Python caller's own time instead.
GPU_WAIT_LEAVES = ("synchronize",)
TOP = 30


def read_samples(folder: Path, newer_than: float, timeout: float = 10.0) -> dict[int, dict]:
    """Every process's cumulative seconds per stack, once each file has been rewritten after `newer_than`."""
    deadline = time.time() + timeout
    while True:
        found = {}
        for path in folder.glob("host-*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # caught between the sampler's write and rename: read again
            found[data["pid"]] = data
        if found and all(d["time"] > newer_than for d in found.values()):
            return found
        if time.time() > deadline:
            raise SystemExit(f"no fresh samples under {folder} (is the server started with DFLASH_HOST_SAMPLES?)")
        time.sleep(0.2)


def scheduler_pid(before: dict[int, dict], after: dict[int, dict]) -> int:
    """The scheduler: named so by SGLang's process title, else the process with the most busy main-thread samples."""
    named = [pid for pid, d in after.items() if "sched" in d["process"] and pid in before]
    if named:
        return named[0]
    return max((pid for pid in after if pid in before),
               key=lambda pid: sum(busy(window(before[pid], after[pid])).values()))


def window(before: dict, after: dict) -> Counter:
    """Seconds per stack between two snapshots."""
    seconds = Counter(after["seconds"])
    seconds.subtract(before["seconds"])
    return Counter({stack: s for stack, s in seconds.items() if s > 0})


def timed_window(before: dict, after: dict, tokens: int) -> dict:
    """The timed functions' calls and host time in the window (DFLASH_HOST_TIMED): per token and per call."""
    out = {}
    for entry, (calls, seconds) in after.get("timed", {}).items():
        calls0, seconds0 = before.get("timed", {}).get(entry, (0, 0.0))
        calls, seconds = calls - calls0, seconds - seconds0
        out[entry] = {"calls": calls, "us_per_token": seconds * 1e6 / max(tokens, 1),
                      "us_per_call": seconds * 1e6 / calls if calls else 0.0}
    return out


def busy(stacks: Counter) -> Counter:
    """The main thread's samples outside its idle waits."""
    out = Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")
        if frames[0] == MAIN_THREAD and frames[-1].rsplit(":", 1)[-1] not in IDLE_LEAVES:
            out[stack] = n
    return out


def per_function(stacks: Counter) -> tuple[Counter, Counter]:
    inclusive, own = Counter(), Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")[1:]
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    return inclusive, own


def drive(port: int, concurrency: int, rounds: int, max_tokens: int, timeout: float) -> int:
    body = {"sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}

    def worker(w: int) -> int:
        tokens = 0
        for r in range(rounds):
            prompt = f"{w}.{r} Explain, step by step, how a compiler turns source code into machine code."
            tokens += post(port, "/generate", {"text": prompt, **body}, timeout)["meta_info"]["completion_tokens"]
        return tokens

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return sum(pool.map(worker, range(concurrency)))


def measure(args, concurrency: int) -> dict:
    folder = Path(args.samples)
    before = read_samples(folder, time.time())
    started = time.time()
    tokens = drive(args.port, concurrency, args.rounds, args.max_tokens, args.timeout)
    seconds = time.time() - started
    after = read_samples(folder, time.time())
    pid = scheduler_pid(before, after)
    stacks = window(before[pid], after[pid])
    main = Counter({s: n for s, n in stacks.items() if s.split(";")[0] == MAIN_THREAD})
    work = busy(stacks)
    inclusive, own = per_function(work)
    us_per_token = 1e6 / max(tokens, 1)
    return {
        "concurrency": concurrency, "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
        "process": after[pid]["process"], "samples": after[pid]["samples"] - before[pid]["samples"],
        "main_seconds": sum(main.values()),
        # of the time requests were in flight (the snapshots' waits around it are idle)
        "busy_share": sum(work.values()) / seconds,
        "busy_us_per_token": sum(work.values()) * us_per_token,
        "gpu_wait_us_per_token": sum(n for s, n in work.items()
                                     if s.rsplit(":", 1)[-1] in GPU_WAIT_LEAVES) * us_per_token,
        "timed": timed_window(before[pid], after[pid], tokens),
        "inclusive_us_per_token": {k: n * us_per_token for k, n in inclusive.most_common(TOP)},
        "self_us_per_token": {k: n * us_per_token for k, n in own.most_common(TOP)},
        "folded": dict(stacks),
    }


def print_report(results: list[dict]) -> None:
    print(f"{'server':<18} {'conc':>4} {'tok/s':>9} {'busy':>6} {'host us/token':>14} {'of it GPU wait':>15}")
    for r in results:
        for level in r["levels"]:
            print(f"{r['label']:<18} {level['concurrency']:>4} {level['tok_per_s']:>9.1f} "
                  f"{level['busy_share']:>6.0%} {level['busy_us_per_token']:>14.1f} "
                  f"{level['gpu_wait_us_per_token']:>15.1f}")
    for r in results:
        for level in r["levels"]:
            if level.get("timed"):
                print(f"\n== {r['label']} c{level['concurrency']}: timed functions (calls, us per call, us per token)")
                for entry, t in level["timed"].items():
                    print(f"  {entry[-80:]:<80} {t['calls']:7d} {t['us_per_call']:9.1f} {t['us_per_token']:8.1f}")
            print(f"\n== {r['label']} c{level['concurrency']}: inclusive host us per token (top 15)")
            for name, us in list(level["inclusive_us_per_token"].items())[:15]:
                print(f"  {name[:90]:<90} {us:8.1f}")
            print(f"== {r['label']} c{level['concurrency']}: self host us per token (top 10)")
            for name, us in list(level["self_us_per_token"].items())[:10]:
                print(f"  {name[:90]:<90} {us:8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int)
    parser.add_argument("--samples", help="the server's DFLASH_HOST_SAMPLES folder")
    parser.add_argument("--out", help="JSON of the figures and folded stacks")
    parser.add_argument("--label", default="server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--report", nargs="+", help="print the table of these OUT.json files")
    args = parser.parse_args()
    if args.report:
        print_report([json.loads(Path(p).read_text()) for p in args.report])
        return 0
    if args.port is None or args.samples is None or args.out is None:
        parser.error("--port, --samples and --out are needed to measure")
    drive(args.port, 1, 1, 16, args.timeout)  # warm: first-use compilation out of the window
    result = {"label": args.label, "rounds": args.rounds, "max_tokens": args.max_tokens,
              "levels": [measure(args, c) for c in args.concurrency]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_report([result])
    return 0


if __name__ == "__main__":
    sys.exit(main())

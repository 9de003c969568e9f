"""Client half of scripts/device/e2e.sh: wait for a server, benchmark it, print the comparison table.

Standard library only (the GPU box has no package registry), plus NEAR_TIE from this repo's dflash_sglang.bench
(the scripts put the repo on PYTHONPATH). Subcommands:
  wait   --port P --pid PID --timeout S          until /health answers (exit 0), the server dies (1), or time
                                                 runs out (3)
  bench  --port P --name NAME --out FILE ...     greedy prompts through /v1/completions at each concurrency,
                                                 acceptance stats through /generate, a sampling smoke test
  report --dir DIR --reference ar NAME...        the table (greedy mismatches vs AR, tok/s, acceptance length)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dflash_sglang.bench import NEAR_TIE

SUBJECTS = ["the harbor", "a violin", "the old map", "winter rain", "a small robot", "the library", "green tea",
            "a mountain road", "the last train", "an empty stage", "the river", "a paper boat", "the night market"]
ASKS = ["Describe {s} in three sentences.", "Write a short poem about {s}.", "List five facts about {s}.",
        "Tell a story that begins with {s}."]


def prompts(count: int) -> list[str]:
    return [f"{i}. " + ASKS[i % len(ASKS)].format(s=SUBJECTS[i % len(SUBJECTS)]) for i in range(count)]


def post(port: int, path: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get(port: int, path: str, timeout: float) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        body = response.read()
        return json.loads(body) if body else {}


EXIT_WAIT_TIMEOUT = 3  # `wait`: still starting when time ran out (1: the server process died)


def cmd_wait(args) -> int:
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        if not Path(f"/proc/{args.pid}").exists():
            print(f"server process {args.pid} exited before it was ready", file=sys.stderr)
            return 1
        try:
            get(args.port, "/health", timeout=5)
            get(args.port, "/v1/models", timeout=5)
            return 0
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(2)
    print(f"server not ready after {args.timeout:.0f}s", file=sys.stderr)
    return EXIT_WAIT_TIMEOUT


def run_all(fn, items, concurrency: int) -> tuple[list, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(fn, items))
    return results, time.perf_counter() - start


def cmd_bench(args) -> int:
    model = get(args.port, "/v1/models", timeout=10)["data"][0]["id"]
    texts = prompts(args.num_prompts)
    greedy = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}

    def complete(prompt: str, sampling: dict = greedy) -> dict:
        response = post(args.port, "/v1/completions", {"model": model, "prompt": prompt, **sampling}, args.timeout)
        return {"text": response["choices"][0]["text"], "tokens": response["usage"]["completion_tokens"]}

    run_all(complete, texts[:2], 2)  # warm-up: first calls compile kernels
    report = {"name": args.name, "num_prompts": len(texts), "max_tokens": args.max_tokens, "runs": {}}
    for concurrency in args.concurrency:
        outputs, wall = run_all(complete, texts, concurrency)
        tokens = sum(o["tokens"] for o in outputs)
        report["runs"][str(concurrency)] = {"texts": [o["text"] for o in outputs], "completion_tokens": tokens,
                                           "wall_s": wall, "tok_per_s": tokens / wall}

    def generate(prompt: str) -> dict:
        sampling = {"max_new_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
        body = {"text": prompt, "sampling_params": sampling}
        if args.logprobs:  # the AR reference: top-2 logprobs at every position, for the near-tie rule
            body.update(return_logprob=True, top_logprobs_num=2)
        return post(args.port, "/generate", body, args.timeout)

    generated, _ = run_all(generate, texts, max(args.concurrency))
    metas = [g["meta_info"] for g in generated]
    report["generate_ids"] = [g["output_ids"] for g in generated]
    if args.logprobs:
        report["top2_margins"] = [[top[0][0] - top[1][0] for top in m["output_top_logprobs"]] for m in metas]
    verify_steps = sum(m.get("spec_verify_ct", 0) for m in metas)
    if verify_steps:
        report["accept_length"] = sum(m["completion_tokens"] for m in metas) / verify_steps
        report["accept_length_mean_per_request"] = sum(m["spec_accept_length"] for m in metas) / len(metas)

    sampled = {"max_tokens": 32, "temperature": 0.8, "top_p": 0.9, "top_k": 50}
    try:
        outputs, _ = run_all(lambda p: complete(p, sampled), texts[:16], 16)
        report["sampling_smoke"] = "ok" if all(o["tokens"] == 32 for o in outputs) else "short outputs"
    except (urllib.error.URLError, KeyError) as e:
        report["sampling_smoke"] = f"failed: {e}"

    if args.log:
        report["startup_line_found"] = args.expect in Path(args.log).read_text(errors="replace")
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def first_divergence_margins(reference: dict, result: dict) -> list[dict]:
    """Per diverging prompt: where the /generate ids first differ from AR's and AR's top-2 margin there."""
    found = []
    for i, (ref, got) in enumerate(zip(reference["generate_ids"], result["generate_ids"])):
        if ref == got:
            continue
        k = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        margins = reference.get("top2_margins", [[]] * len(reference["generate_ids"]))[i]
        found.append({"prompt": i, "index": k, "margin": margins[k] if k < len(margins) else float("inf")})
    return found


def completion_mismatches(reference: dict, result: dict) -> dict[str, int]:
    """Per concurrency: how many of the result's /v1/completions texts differ from the reference's at concurrency 1."""
    expected = reference["runs"]["1"]["texts"]
    return {c: sum(a != b for a, b in zip(run["texts"], expected)) for c, run in result["runs"].items()}


def cmd_report(args) -> int:
    results = {}
    for name in [args.reference, *args.contenders]:
        path = Path(args.dir) / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
    reference = results[args.reference]
    passed = {}
    rows = [("contender", "conc", "greedy mismatches vs AR", "tok/s", "accept len", "startup line", "sampling")]
    for name, result in results.items():
        if result is None:
            rows.append((name, "-", "no results (see the group log)", "-", "-", "-", "-"))
            passed[name] = False
            continue
        accept = f"{result['accept_length']:.2f}" if "accept_length" in result else "-"
        line = {True: "found", False: "MISSING"}.get(result.get("startup_line_found"), "-")
        passed[name] = reference is not None and result.get("startup_line_found") is not False
        counts = completion_mismatches(reference, result) if reference is not None else {}
        for concurrency, run in result["runs"].items():
            mismatches = "-"
            if reference is not None:
                count = counts[concurrency]
                mismatches = f"{count}/{len(reference['runs']['1']['texts'])}"
                passed[name] &= count == 0 or name == args.reference
            rows.append((name, concurrency, mismatches, f"{run['tok_per_s']:.1f}", accept, line,
                         result.get("sampling_smoke", "-")))
    divergences = {name: first_divergence_margins(reference, result) for name, result in results.items()
                   if result is not None and reference is not None and name != args.reference}
    ok = all(passed.get(name, False) for name in args.must_pass)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    summary = {"ok": ok, "passed": passed, "near_tie_tolerance": NEAR_TIE, "divergences": divergences,
               "results": {n: r and {k: v for k, v in r.items() if k != "runs"} for n, r in results.items()}}
    if results.get("builtin") and results.get("ours"):
        # Ours against SGLang's own DFLASH worker, whatever AR did: the two should emit the same tokens.
        same = sum(a == b for a, b in zip(results["builtin"]["generate_ids"], results["ours"]["generate_ids"]))
        summary["ours_equals_builtin"] = f"{same}/{len(results['ours']['generate_ids'])}"
        summary["ours_over_builtin_tok_s"] = {
            c: results["ours"]["runs"][c]["tok_per_s"] / results["builtin"]["runs"][c]["tok_per_s"]
            for c in results["ours"]["runs"] if results["builtin"]["runs"].get(c, {}).get("tok_per_s")}
    Path(args.dir, "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    for name, found in divergences.items():
        if found:
            worst = max(d["margin"] for d in found)
            print(f"{name}: {len(found)} /generate outputs diverge from AR; AR top-2 logprob margin at the first "
                  f"divergent token: max {worst:.4f} ({'all near-ties' if worst < NEAR_TIE else 'NOT all near-ties'}"
                  f", tolerance {NEAR_TIE})")
    if "ours_equals_builtin" in summary:
        print(f"ours vs builtin: identical /generate outputs on {summary['ours_equals_builtin']} prompts")
        ratios = ", ".join(f"c{c} {r:.2f}x" for c, r in summary["ours_over_builtin_tok_s"].items())
        print(f"ours / builtin tok/s: {ratios} (groups that share a GPU make this a smoke figure)")
    verdict = ", ".join(f"{name}: {'pass' if passed.get(name) else 'FAIL'}" for name in args.contenders)
    print(f"\n{'PASS' if ok else 'FAIL'} ({verdict}; pass = served, logged its worker, matched AR greedily)")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("wait")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=240)
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("bench")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.add_argument("--log", help="server log to search for --expect")
    p.add_argument("--expect", default="")
    p.add_argument("--logprobs", action="store_true", help="record AR's top-2 logprobs (the reference server)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    p.add_argument("--reference", default="ar")
    p.add_argument("--must-pass", nargs="+", default=[], help="contenders the exit status depends on")
    p.add_argument("contenders", nargs="+")
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark of the kernels against their torch references, on one GPU.

Tree ops, for every (bs, N) in {1, 8, 32, 64} x {16, 32, 64} (N draft nodes, depth 16, top-8, vocabulary
151936, hidden 4096 bf16): the mean time per call of the CUDA kernel launched eagerly with preallocated outputs
(what a caller pays, launch included), of the same calls replayed from a CUDA graph (device time), and of the
torch reference on the same device (the tree build reference runs its heap on the host).

The drafter's context K/V (`context_kv_norm_rope`, bf16, float32 RoPE cache as SGLang keeps it on CUDA) for
N in {16, 128, 1024, 4096} context tokens at L x H x D = 5 x 8 x 128 (the published Qwen3-32B / Gemma-4-31B
drafter shapes) and 5 x 4 x 512: the same three times plus the reference replayed from a graph, whose eager
time is what `write_context_kv` paid before the kernel, and the kernel's memory throughput.

The chain step's ops (`chain_block`, `chain_accept_greedy`) at B = 16 for bs in {1, 8, 32, 64}: the kernel's
time per eager call and replayed from a graph, and the reference's eager time, i.e. what the worker's torch path
paid per step in launches.

Writes bench_kernels.json and bench_kernels.md (summaries and full tables) under --out and prints the
summaries last.

    python scripts/bench_kernels.py --out out/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dflash_sglang.kernels import (
    build_draft_tree,
    chain_accept_greedy,
    chain_block,
    commit_tree,
    context_kv_norm_rope,
    draw_verify_randoms,
    reference,
    tree_verify_inputs,
    verify_tree_greedy,
    verify_tree_sampling,
)
from dflash_sglang.kernels.buffers import (empty_chain_block, empty_chain_step, empty_context_kv, empty_tree,
                                          empty_tree_commit, empty_verify, empty_verify_inputs)

DEPTH, TOPK, VOCAB, FEATURES = 16, 8, 151_936, 4096
BATCHES, BUDGETS = (1, 8, 32, 64), (16, 32, 64)
CONTEXT_TOKENS = (16, 128, 1024, 4096)
CONTEXT_SHAPES = ((5, 8, 128), (5, 4, 512))  # layers, kv heads, head_dim
CONTEXT_MAX_POSITION = 40_960
CHAIN_BLOCK = 16


def time_eager(fn, reps: int) -> float:
    """Mean microseconds per call over `reps` back-to-back calls, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def time_graph(fn, calls: int = 20, replays: int = 10) -> float:
    """Mean microseconds per call of `calls` captured calls replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


def cases(bs: int, budget: int, device) -> dict[str, tuple]:
    """Per op: (kernel call with preallocated outputs, reference call, whether the kernel call mutates inputs)."""
    g = torch.Generator(device=device).manual_seed(bs * 100 + budget)
    n = budget + 1
    values, ids = torch.randn((bs, DEPTH, 4096), generator=g, device=device).log_softmax(-1).topk(TOPK, dim=-1)
    roots = torch.randint(0, VOCAB, (bs,), generator=g, device=device)
    start = torch.randint(0, 2048, (bs,), generator=g, device=device)
    tree = build_draft_tree(roots, values, ids, start, budget)
    tree_out = empty_tree(bs, n, device)

    probs = (torch.randn((bs, n, VOCAB), generator=g, device=device) * 3).softmax(-1)
    predict = probs.argmax(-1)
    coins, race = draw_verify_randoms(bs, n, VOCAB, device, g)
    links = (tree.tokens, tree.first_child, tree.next_sibling)
    verify_out = empty_verify(bs, DEPTH, device)
    sampled = verify_tree_sampling(*links, probs, coins, race, DEPTH)

    pool_rows, max_len = bs + 8, 4096
    table = torch.randperm(pool_rows * max_len, device=device).int().reshape(pool_rows, max_len)
    rows = torch.randperm(pool_rows, device=device)[:bs]
    seq_lens = torch.randint(0, max_len - n, (bs,), generator=g, device=device)
    mask_size = int(n * (seq_lens + n).sum())
    inputs_out = empty_verify_inputs(bs, n, mask_size, device)
    commit_out = empty_tree_commit(bs, DEPTH, device)
    path, accept, emitted = sampled.path, sampled.accept_len, sampled.emitted

    return {
        "build_draft_tree": (lambda: build_draft_tree(roots, values, ids, start, budget, out=tree_out),
                             lambda: reference.build_draft_tree(roots, values, ids, start, budget)),
        "verify_tree_greedy": (lambda: verify_tree_greedy(*links, predict, DEPTH, out=verify_out),
                               lambda: reference.verify_tree_greedy(*links, predict, DEPTH)),
        "verify_tree_sampling": (lambda: verify_tree_sampling(*links, probs, coins, race, DEPTH, out=verify_out),
                                 lambda: reference.verify_tree_sampling(*links, probs, coins, race, DEPTH)),
        "tree_verify_inputs": (lambda: tree_verify_inputs(tree.ancestor_mask, seq_lens, rows, table, mask_size,
                                                          out=inputs_out),
                               lambda: reference.tree_verify_inputs(tree.ancestor_mask, seq_lens, rows, table,
                                                                    mask_size)),
        # Every call permutes the same table entries again: the values drift, the work does not.
        "commit_tree": (lambda: commit_tree(table, rows, seq_lens, path, accept, emitted, n, out=commit_out),
                        lambda: reference.commit_tree(table.clone(), rows, seq_lens, path, accept, emitted, n)),
    }


def context_case(tokens: int, layers: int, heads: int, head_dim: int, device) -> tuple:
    """(kernel call with preallocated outputs, reference call, bytes the kernel moves)."""
    g = torch.Generator(device=device).manual_seed(tokens * 10 + head_dim)
    kv = torch.randn((tokens, layers, 2, heads, head_dim), generator=g, device=device).bfloat16()
    scale = 1.0 + 0.3 * torch.randn((layers, head_dim), generator=g, device=device)
    positions = torch.randint(0, CONTEXT_MAX_POSITION, (tokens,), generator=g, device=device)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(CONTEXT_MAX_POSITION, device=device).float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    out = empty_context_kv(layers, tokens, heads, head_dim, kv.dtype, device)
    moved = 2 * kv.numel() * kv.element_size() + tokens * head_dim * 4  # kv in, keys + values out, cache rows
    return (lambda: context_kv_norm_rope(kv, scale, 1e-6, positions, cache, out=out),
            lambda: reference.context_kv_norm_rope(kv, scale, 1e-6, positions, cache), moved)


def chain_cases(bs: int, device) -> dict[str, tuple]:
    """Per chain op: (kernel call with preallocated outputs, reference call)."""
    g = torch.Generator(device=device).manual_seed(bs)
    pool_rows, max_len = bs + 8, 4096
    table = torch.randperm(pool_rows * max_len, device=device).int().reshape(pool_rows, max_len)
    rows = torch.randperm(pool_rows, device=device)[:bs]
    seq_lens = torch.randint(0, max_len - CHAIN_BLOCK, (bs,), generator=g, device=device)
    bonus = torch.randint(0, VOCAB, (bs,), generator=g, device=device)
    predicted = torch.randint(0, VOCAB, (bs, CHAIN_BLOCK), generator=g, device=device)
    candidates = torch.cat([bonus[:, None], predicted[:, :-1]], dim=1)  # every draft kept: the longest walk
    block_out, step_out = empty_chain_block(bs, CHAIN_BLOCK, device), empty_chain_step(bs, CHAIN_BLOCK, device)
    return {
        "chain_block": (lambda: chain_block(bonus, seq_lens, rows, table, CHAIN_BLOCK, 7, out=block_out),
                        lambda: reference.chain_block(bonus, seq_lens, rows, table, CHAIN_BLOCK, 7)),
        "chain_accept_greedy": (lambda: chain_accept_greedy(candidates, predicted, seq_lens, out=step_out),
                                lambda: reference.chain_accept_greedy(candidates, predicted, seq_lens)),
    }


def chain_markdown(results: list[dict]) -> str:
    lines = [f"| op (B = {CHAIN_BLOCK}) | bs | kernel us | kernel (graph) us | reference us | reference / kernel |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['op']} | {r['bs']} | {r['kernel_us']:.1f} | {r['kernel_graph_us']:.1f} | "
                     f"{r['reference_us']:.1f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def context_markdown(results: list[dict]) -> str:
    lines = ["| L x H x D | N | kernel us | kernel (graph) us | GB/s (graph) | reference us | reference (graph) us | "
             "reference / kernel |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['layers']} x {r['heads']} x {r['head_dim']} | {r['tokens']} | {r['kernel_us']:.1f} | "
                     f"{r['kernel_graph_us']:.1f} | {r['gb_per_s']:.0f} | {r['reference_us']:.1f} | "
                     f"{r['reference_graph_us']:.1f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    lines = ["| op | bs | N | kernel us | kernel (graph) us | reference us | reference / kernel |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['op']} | {r['bs']} | {r['budget']} | {r['kernel_us']:.1f} | {r['kernel_graph_us']:.1f} | "
                     f"{r['reference_us']:.1f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """One row per (op, bs): kernel microseconds and reference/kernel ratio for each N."""
    lines = ["| op | bs | " + " | ".join(f"N={b}: kernel us (ref/kernel)" for b in BUDGETS) + " |",
             "|---|---:|" + "---:|" * len(BUDGETS)]
    cell = {(r["op"], r["bs"], r["budget"]): r for r in results}
    for op in dict.fromkeys(r["op"] for r in results):
        for bs in BATCHES:
            row = [cell[op, bs, b] for b in BUDGETS]
            lines.append(f"| {op} | {bs} | " + " | ".join(f"{r['kernel_us']:.1f} ({r['speedup']:.0f}x)" for r in row)
                         + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--reps", type=int, default=50, help="timed kernel calls per case")
    parser.add_argument("--reference-reps", type=int, default=3, help="timed reference calls per case")
    args = parser.parse_args()
    os.environ.setdefault("DFLASH_KERNELS", "cuda")  # time the kernels, never a silent fallback
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)

    def timings(kernel, ref, reference_reps: int) -> dict:
        kernel_us, reference_us = time_eager(kernel, args.reps), time_eager(ref, reference_reps)
        return {"kernel_us": kernel_us, "kernel_graph_us": time_graph(kernel), "reference_us": reference_us,
                "speedup": reference_us / kernel_us}

    results, began = [], time.perf_counter()
    for bs in BATCHES:
        for budget in BUDGETS:
            for op, (kernel, ref) in cases(bs, budget, device).items():
                results.append({"op": op, "bs": bs, "budget": budget, **timings(kernel, ref, args.reference_reps)})
            torch.cuda.empty_cache()
    chain_results = [{"op": op, "bs": bs, **timings(kernel, ref, args.reps)}
                     for bs in BATCHES for op, (kernel, ref) in chain_cases(bs, device).items()]
    context_results = []
    for layers, heads, head_dim in CONTEXT_SHAPES:
        for tokens in CONTEXT_TOKENS:
            kernel, ref, moved = context_case(tokens, layers, heads, head_dim, device)
            timed = timings(kernel, ref, args.reps)
            context_results.append({"op": "context_kv_norm_rope", "tokens": tokens, "layers": layers, "heads": heads,
                                    "head_dim": head_dim, **timed, "gb_per_s": moved / timed["kernel_graph_us"] / 1e3,
                                    "reference_graph_us": time_graph(ref)})
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "depth": DEPTH, "topk": TOPK,
            "vocab": VOCAB, "features": FEATURES, "context_dtype": "bfloat16", "seconds": time.perf_counter() - began}
    (args.out / "bench_kernels.json").write_text(json.dumps({"meta": meta, "results": results, "chain": chain_results,
                                                             "context_kv": context_results}, indent=1))
    short = summary(results)
    chain = chain_markdown(chain_results)
    context = context_markdown(context_results)
    (args.out / "bench_kernels.md").write_text(f"{meta}\n\n{short}\n\n{chain}\n\n{context}\n\n{markdown(results)}\n")
    print(short)
    print()
    print(chain)
    print()
    print(context)


if __name__ == "__main__":
    main()

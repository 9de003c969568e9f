"""A chain verify's attention, kernel against kernel, on the GPU: SGLang 0.5.16's triton prefill kernel
(`extend_attention_fwd`, what its TARGET_VERIFY runs by default), its split-KV verify kernel (`verify_splitkv_fwd`),
ours (`dflash_sglang.kernels.split_attention`, what --speculative-dflash-verify-splitkv switches on) and, for scale,
SGLang's decode kernel over one row (an AR step's attention), timed as CUDA-graph replays the way the server runs
them. Per layer of the given head layout, at several context lengths and batch sizes, B query rows per
request (a chain, or with --tree a random tree under its custom mask); the verify kernels' outputs are checked
against the float32 reference (`verify_attention_reference`) on the same inputs.

    PYTHONPATH=$PWD:$PYTHONPATH python scripts/device/verify_attention_bench.py --out $OUT/verify-attention.json \
        [--graph-buffer] [--tree --block 64] [--min-split "128 256"]

(keep `:$PYTHONPATH`: on the box it holds SGLang's site.) Prints a table last: us per layer for each kernel, ours
against the prefill kernel, max |error|; with --min-split, ours again at each of those least keys per split. The
committed results: docs/results/verify-attention-h200-2026-11-30*.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# name -> (query heads, KV heads, head dim): Qwen3-32B and SmolLM2-135M.
LAYOUTS = {"qwen3-32b": (64, 8, 128), "smollm2-135m": (9, 3, 64)}


def timed_us(fn, iters: int, per_graph: int = 10) -> float:
    """Median GPU microseconds of one `fn`: `per_graph` calls captured in a CUDA graph (as the server replays
    them: no launch cost), each replay CUDA-event-timed, `iters` replays after a warm-up."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_graph)
    return sorted(times)[len(times) // 2]


def tree_mask(bs: int, context: int, block: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tree of `block` nodes per request (each node under an earlier one), flattened in SGLang's
    custom-mask layout (block rows of context + block, the context's set) as uint8, and its mask_indptr."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(bs):
        seen = torch.eye(block, dtype=torch.bool)
        for node in range(1, block):
            seen[node] |= seen[int(torch.randint(0, node, (1,), generator=g))]
        rows.append(torch.cat([torch.ones(block, context, dtype=torch.bool), seen], dim=1).reshape(-1))
    indptr = torch.arange(0, bs + 1, dtype=torch.int64) * block * (context + block)
    return torch.cat(rows).to(device, torch.uint8), indptr.to(device)


def case(layout: str, bs: int, context: int, block: int, iters: int, graph_buffer: bool = False,
         tree: bool = False, dev: str = "cuda", dtype: torch.dtype = torch.bfloat16,
         min_splits: tuple[int, ...] = ()) -> dict:
    """One row of the table (`dev` and `dtype` other than CUDA / bf16 only for a dry run of the plumbing)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from sglang.kernels.ops.attention.verify_splitkv import verify_splitkv_fwd

    from dflash_sglang.kernels import split_attention
    from dflash_sglang.kernels.split_attention import verify_attention, verify_attention_reference

    heads, kv_heads, dim = LAYOUTS[layout]
    scale = dim ** -0.5
    gen = torch.Generator(device=dev).manual_seed(bs * 100003 + context)
    slots = bs * (context + block) + 1
    k_buffer = torch.randn(slots, kv_heads, dim, device=dev, dtype=dtype, generator=gen)
    v_buffer = torch.randn(slots, kv_heads, dim, device=dev, dtype=dtype, generator=gen)
    # Each request's prefix in scattered slots, as a paged pool leaves them.
    order = torch.randperm(slots - 1, device=dev, generator=gen) + 1
    prefix_slots = order[: bs * context].view(bs, context)
    kv_indices = prefix_slots.reshape(-1).to(torch.int64)
    if graph_buffer:
        # The server's graphs pass the whole preallocated index buffer, and the split kernel sizes its split count
        # from that buffer's length per request: 16 splits whatever the context.
        kv_indices = torch.cat([kv_indices, torch.zeros(bs * 16384, dtype=torch.int64, device=dev)])
    kv_indptr = torch.arange(0, bs + 1, device=dev, dtype=torch.int32) * context
    qo_indptr = torch.arange(0, bs + 1, device=dev, dtype=torch.int32) * block
    q = torch.randn(bs * block, heads, dim, device=dev, dtype=dtype, generator=gen)
    k_block = torch.randn(bs * block, kv_heads, dim, device=dev, dtype=dtype, generator=gen)
    v_block = torch.randn(bs * block, kv_heads, dim, device=dev, dtype=dtype, generator=gen)
    mask, mask_indptr = tree_mask(bs, context, block, seed=context, device=dev) if tree else (None, None)
    args = lambda o: (q, k_block, v_block, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,  # noqa: E731
                      mask, True, mask_indptr, block, 1.0, 1.0, scale)
    out_extend, out_split = torch.empty_like(q), torch.empty_like(q)
    extend_us = timed_us(lambda: extend_attention_fwd(*args(out_extend)), iters)
    # SGLang's split kernel computes causal attention only (it never reads a tree's mask).
    served = not tree and verify_splitkv_fwd(*args(out_split), max_bs=bs)  # sizes its scratch outside the graph
    split_us = timed_us(lambda: verify_splitkv_fwd(*args(out_split), max_bs=bs), iters) if served else None
    out_ours = torch.empty_like(q)
    ours = lambda: verify_attention(q, k_block, v_block, k_buffer, v_buffer, kv_indptr, kv_indices,  # noqa: E731
                                    block, scale, out=out_ours, mask=mask, mask_indptr=mask_indptr)
    ours_us = timed_us(ours, iters)
    want = verify_attention_reference(q, k_block, v_block, k_buffer, v_buffer, kv_indptr[: bs + 1],
                                      kv_indices[: bs * context], block, scale, torch.empty(q.shape, device=dev),
                                      mask, mask_indptr)
    max_err = lambda out: (out.float() - want).abs().max().item()  # noqa: E731
    ours_by_min_split, err_by_min_split, default_min_split = {}, {}, split_attention.MIN_SPLIT
    for min_split in min_splits:  # the kernel reads MIN_SPLIT at each launch
        split_attention.MIN_SPLIT = min_split
        try:
            ours_by_min_split[min_split] = timed_us(ours, iters)
            err_by_min_split[min_split] = max_err(out_ours)
        finally:
            split_attention.MIN_SPLIT = default_min_split
    ours()  # out_ours as the default split count writes it, for the error below

    # An AR step's attention: one row per request over its prefix plus itself (decode kernel, 8 KV splits).
    splits = 8
    decode_indices = torch.cat([prefix_slots, order[bs * context: bs * context + bs, None]], 1).reshape(-1)
    decode_indptr = torch.arange(0, bs + 1, device=dev, dtype=torch.int32) * (context + 1)
    q_row = q.view(bs, block, heads, dim)[:, 0].contiguous()
    out_row = torch.empty_like(q_row)
    logits = torch.empty(bs, heads, splits, dim, device=dev, dtype=torch.float32)
    lse = torch.empty(bs, heads, splits, device=dev, dtype=torch.float32)
    num_splits = torch.full((bs,), splits, device=dev, dtype=torch.int32)
    decode_us = timed_us(lambda: decode_attention_fwd(q_row, k_buffer, v_buffer, out_row, decode_indptr,
                                                      decode_indices.to(torch.int64), logits, lse, num_splits,
                                                      splits, scale, 1.0, 1.0), iters)

    return {"layout": layout, "bs": bs, "context": context, "block": block, "graph_buffer": graph_buffer,
            "tree": tree, "extend_us": extend_us,
            "split_us": split_us, "split_served": bool(served), "ours_us": ours_us, "decode_us": decode_us,
            "ours_us_by_min_split": ours_by_min_split, "max_err_ours_by_min_split": err_by_min_split,
            "max_err_extend": max_err(out_extend), "max_err_split": max_err(out_split) if served else None,
            "max_err_ours": max_err(out_ours)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--time-limit", type=float, default=150, help="seconds; the cases left are skipped")
    parser.add_argument("--graph-buffer", action="store_true",
                        help="index buffers as long as the server's CUDA graphs pass them (16 KV splits)")
    parser.add_argument("--tree", action="store_true",
                        help="a random tree of --block nodes per request under its custom mask (try --block 64); "
                             "SGLang's split kernel, causal only, sits out")
    parser.add_argument("--min-split", default="",
                        help="ours again with each of these least prefix keys per split (the kernel's MIN_SPLIT)")
    args = parser.parse_args()
    min_splits = tuple(int(x) for x in args.min_split.split())
    plan = [("qwen3-32b", bs, ctx) for bs in (1, 4) for ctx in (256, 1024, 4096, 8192)]
    plan += [("smollm2-135m", bs, ctx) for bs in (1, 32) for ctx in (256, 1024, 4096)]
    start, rows = time.monotonic(), []
    for layout, bs, ctx in plan:
        if time.monotonic() - start > args.time_limit:
            rows.append({"layout": layout, "bs": bs, "context": ctx, "skipped": "time limit"})
            continue
        try:
            rows.append(case(layout, bs, ctx, args.block, args.iters, args.graph_buffer, args.tree,
                             min_splits=min_splits))
        except Exception as e:  # one case's failure is recorded; the others still run
            rows.append({"layout": layout, "bs": bs, "context": ctx, "error": f"{type(e).__name__}: {e}"})
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"{'layout':14} {'bs':>3} {'ctx':>5} {'extend us':>10} {'split us':>9} {'ours us':>8} {'ours/ext':>8} "
          f"{'decode us':>10} {'err ext':>8} {'err split':>9} {'err ours':>8}"
          + "".join(f" {f'min {m} us':>11}" for m in min_splits))
    for r in rows:
        if "extend_us" not in r:
            print(f"{r['layout']:14} {r['bs']:>3} {r['context']:>5} {r.get('error') or r.get('skipped')}")
            continue
        split = r["split_us"]
        split_text = "-" if split is None else f"{split:.1f}"
        split_err = "-" if split is None else f"{r['max_err_split']:.4f}"
        ratio = f"{r['ours_us'] / r['extend_us']:.2f}x"
        print(f"{r['layout']:14} {r['bs']:>3} {r['context']:>5} {r['extend_us']:>10.1f} {split_text:>9} "
              f"{r['ours_us']:>8.1f} {ratio:>8} {r['decode_us']:>10.1f} {r['max_err_extend']:>8.4f} {split_err:>9} "
              f"{r['max_err_ours']:>8.4f}" + "".join(f" {r['ours_us_by_min_split'][m]:>11.1f}" for m in min_splits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a drafter training step's time goes, at SmolLM2-135M's shape, with synthetic data.

    python3 scripts/device/profile_train.py --out DIR [--steps 40] [--batch-size 16] [--num-anchors 128]
    python3 scripts/device/profile_train.py --out DIR --tiny --device cpu --steps 2     # plumbing check

A random LlamaForCausalLM with SmolLM2-135M-Instruct's config (a step costs the same whatever the weights), the
recipe's drafter (3 layers from the target's last ones, B = 16, bf16 autocast, fused AdamW), and sequences of random
tokens whose prompt and answer lengths are drawn like the regenerated SmolLM2 data (prompts 30-250 tokens, answers
up to 512, 40% of them cut at 512). For each batch order (length-bucketed as `train` draws it, and plain random):
warm-up steps, then timed steps (the bucketed order once more with the target's outputs cached, as `train`
runs every epoch after the first), each phase between CUDA events (target: the target forward, anchors, masks and
the drafter's context K/V; drafter: the packed draft layers; loss: the head loss with its gradient; backward: the
drafter's backward and gradient clipping; optimizer), then a torch-profiler pass over a few steps whose CUDA kernels
are summed by name. Writes DIR/profile-train.json and prints a table last. Needs no payload: run it beside
anything (~2 minutes on an H200).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dflash_sglang.train as train_module
from dflash_sglang.config import parse_drafter_config
from dflash_sglang.target import TargetModel
from dflash_sglang.tiny import tiny_target_layer_ids
from dflash_sglang.train import (Sequence, TargetOutputCache, batch_loss, copy_target_layers, default_gamma,
                                 drafter_config_for_target, epoch_order, init_drafter, loss_weights,
                                 target_cache_budget)

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100_000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10_000.0,
            tie_word_embeddings=True)
PHASES = ("target", "drafter", "loss", "backward", "optimizer")
MASK_TOKEN_ID = 16


def synthetic_sequences(count: int, vocab: int, max_answer: int, g: torch.Generator) -> list[Sequence]:
    sequences = []
    for _ in range(count):
        prompt = int(torch.randint(30, 251, (), generator=g))
        cut = bool(torch.rand((), generator=g) < 0.4)
        answer = max_answer if cut else int(torch.randint(20, max_answer + 1, (), generator=g))
        ids = torch.randint(MASK_TOKEN_ID + 1, vocab, (prompt + answer,), generator=g, dtype=torch.int32)
        mask = torch.cat([torch.zeros(prompt, dtype=torch.bool), torch.ones(answer, dtype=torch.bool)])
        sequences.append(Sequence(ids, mask))
    return sequences


class PhaseTimer:
    """CUDA events around the phases of one step (wall clock on CPU); read after the step's synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def read(self) -> dict[str, float]:
        """ms of each phase: from its mark to the next one."""
        out = {}
        for (name, start), (_, end) in zip(self.marks, self.marks[1:]):
            out[name] = start.elapsed_time(end) if self.cuda else 1000 * (end - start)
        self.marks = []
        return out


def instrument(timer: PhaseTimer) -> None:
    """Marks at the phase boundaries inside `batch_loss` (it looks these functions up in the train module)."""
    def before(name, fn):
        def wrapped(*args, **kwargs):
            timer.mark(name)
            return fn(*args, **kwargs)
        return wrapped

    train_module.pad_batch = before("target", train_module.pad_batch)
    train_module.packed_drafter_forward = before("drafter", train_module.packed_drafter_forward)
    train_module.weighted_cross_entropy = before("loss", train_module.weighted_cross_entropy)


def run(order_name: str, batches: list[list[int]], sequences: list[Sequence], drafter, target, weights, args, device,
        timer, cache: TargetOutputCache | None = None) -> dict:
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(1)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def step(batch) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(drafter, target, None, [sequences[i] for i in batch], args.num_anchors, weights, generator,
                          8192, autocast, args.soft_labels, cache, batch)
        timer.mark("backward")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        timer.mark("optimizer")
        optimizer.step()
        timer.mark("end")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return timer.read()

    timed = batches[args.warmup: args.warmup + args.steps]
    # A cached run's timed steps are a later epoch's: their target outputs are in the cache already.
    for batch in batches[: args.warmup] + (timed if cache is not None else []):
        step(batch)
    started = time.perf_counter()
    phases = [step(batch) for batch in timed]
    seconds = time.perf_counter() - started
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for batch in timed[: args.profile_steps]:
            step(batch)
    kernels = {}
    for event in prof.key_averages():
        us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0 and (device.type != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA):
            kernels[event.key] = kernels.get(event.key, 0.0) + us / 1000 / max(1, min(args.profile_steps, len(timed)))
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
    return {
        "order": order_name,
        "steps": len(timed),
        "steps_per_s": len(timed) / seconds,
        "ms_per_step": 1000 * seconds / len(timed),
        "phase_ms": {name: sum(p.get(name, 0.0) for p in phases) / len(phases) for name in PHASES},
        "tokens_per_step": sum(sum(len(sequences[i].ids) for i in b) for b in timed) / len(timed),
        "padded_tokens_per_step": sum(len(b) * max(len(sequences[i].ids) for i in b) for b in timed) / len(timed),
        "top_kernels_ms_per_step": [{"name": name[:90], "ms": ms} for name, ms in top],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-anchors", type=int, default=128)
    parser.add_argument("--draft-layers", type=int, default=3)
    parser.add_argument("--soft-labels", type=float, default=0.0, help="as `train --soft-labels` (its cost)")
    parser.add_argument("--gamma", type=float, default=None,
                        help="as `train --gamma` (a low one leaves the lightest rows out of the loss)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small random target instead of SmolLM2's shape")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM2))
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device=device, dtype=dtype)
    layer_ids = tiny_target_layer_ids(config.num_hidden_layers, args.draft_layers)
    target = TargetModel(model, layer_ids)
    target.model.requires_grad_(False)
    raw = drafter_config_for_target(config, args.draft_layers, layer_ids, 16, MASK_TOKEN_ID)
    drafter = init_drafter(parse_drafter_config(raw), 0, 0.02)
    copy_target_layers(drafter, target)
    drafter = drafter.to(device).train()
    weights = loss_weights(16, args.gamma or default_gamma(16))
    timer = PhaseTimer(device)
    instrument(timer)

    needed = args.batch_size * (args.warmup + args.steps)
    sequences = synthetic_sequences(needed, config.vocab_size, 64 if args.tiny else 512, torch.Generator().manual_seed(0))
    lengths = [len(s.ids) for s in sequences]
    bucketed = epoch_order(lengths, args.batch_size, 0, 0)
    orders = {"length-bucketed": bucketed, "random": list(range(needed))}
    results = []
    for name, order in orders.items():
        batches = [order[lo: lo + args.batch_size] for lo in range(0, needed, args.batch_size)]
        results.append(run(name, batches, sequences, drafter, target, weights, args, device, timer))
        if name == "length-bucketed":
            cache = TargetOutputCache(target_cache_budget(None, device) if device.type == "cuda" else 2**34)
            results.append(run("bucketed, cached", batches, sequences, drafter, target, weights, args, device, timer,
                               cache))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": "tiny" if args.tiny else "SmolLM2-135M", "settings": vars(args), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile-train.json").write_text(json.dumps(report, indent=1))
    for r in results:
        print(f"== {r['order']}: top kernels (ms per step)")
        for k in r["top_kernels_ms_per_step"][:12]:
            print(f"  {k['name']:<90} {k['ms']:8.2f}")
    print(f"\n{'order':<16} {'steps/s':>8} {'ms/step':>8} {'tokens':>7} {'padded':>7} "
          + " ".join(f"{p + ' ms':>12}" for p in PHASES))
    for r in results:
        print(f"{r['order']:<16} {r['steps_per_s']:8.2f} {r['ms_per_step']:8.1f} {r['tokens_per_step']:7.0f} "
              f"{r['padded_tokens_per_step']:7.0f} " + " ".join(f"{r['phase_ms'][p]:12.1f}" for p in PHASES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

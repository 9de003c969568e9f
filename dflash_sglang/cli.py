"""`dflash-sglang` command line: make-tiny, check, generate, demo.

User errors (bad paths, incompatible pairs, bad flags) exit 2 with one line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from dflash_sglang.config import DFlashConfigError
from dflash_sglang.prompts import prompt_ids

EXIT_USAGE = 2


def _fail(messages: list[str]) -> int:
    for m in messages:
        print(f"error: {m}", file=sys.stderr)
    return EXIT_USAGE


def cmd_make_tiny(args) -> int:
    from dflash_sglang.tiny import make_tiny

    target, drafter = make_tiny(args.arch, args.out, seed=args.seed, block_size=args.block_size,
                                draft_layers=args.draft_layers, vocab_size=args.vocab_size, hidden_size=args.hidden_size)
    print(json.dumps({"target": str(target), "drafter": str(drafter)}))
    return 0


def cmd_make_shape(args) -> int:
    from dflash_sglang.shapes import write_shape

    target, drafter = write_shape(args.shape, args.out)
    print(json.dumps({"target": str(target), "drafter": str(drafter)}))
    return 0


def check_pair_at(target: str, drafter: str, block_size: int | None = None) -> list[str]:
    """Every problem with this target/drafter pair (config, compatibility, weight shapes); [] when usable."""
    from dflash_sglang.config import TargetInfo, load_drafter_config, validate_pair
    from dflash_sglang.loader import load_drafter_state_dict

    try:
        cfg = load_drafter_config(drafter)
        info = TargetInfo.from_path(target)
    except DFlashConfigError as e:
        return e.messages
    errors = validate_pair(cfg, info, block_size)
    if errors:
        # Weight shapes follow the config: once the config is wrong, their mismatches only repeat it.
        return errors
    try:
        load_drafter_state_dict(drafter, cfg)
    except DFlashConfigError as e:
        errors.extend(e.messages)
    return errors


def cmd_check(args) -> int:
    errors = check_pair_at(args.target, args.drafter, args.block_size)
    if errors:
        return _fail(errors)
    print(f"ok: {args.drafter} drafts for {args.target}")
    return 0


def _tokenize(target: str, prompt: str, chat: bool):
    from transformers import AutoTokenizer

    if not (Path(target) / "tokenizer.json").is_file() and not (Path(target) / "tokenizer_config.json").is_file():
        return None, None
    tok = AutoTokenizer.from_pretrained(target)
    return tok, prompt_ids(tok, prompt, chat)


def cmd_generate(args) -> int:
    import torch

    from dflash_sglang.engine import DFlashEngine
    from dflash_sglang.verify import SamplingParams

    if args.mode != "ar" and not args.drafter:
        return _fail([f"--mode {args.mode} needs --drafter"])
    if args.drafter:
        errors = check_pair_at(args.target, args.drafter, args.block_size)
        if errors:
            return _fail(errors)
    if args.prompt_ids:
        tok, ids = None, [int(x) for x in args.prompt_ids.split(",")]
    else:
        tok, ids = _tokenize(args.target, args.prompt, args.chat)
        if ids is None:
            return _fail([f"{args.target} has no tokenizer; pass --prompt-ids 1,2,3 instead of --prompt"])
    if not ids:
        return _fail(["the prompt is empty after tokenization; give at least one token"])
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = DFlashEngine.load(args.target, args.drafter if args.mode != "ar" else None, dtype=dtype, device=device)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = tok.eos_token_id if tok is not None and not args.ignore_eos else None
    result = engine.generate([ids], args.max_new_tokens, mode=args.mode, params=params, block_size=args.block_size,
                             tree_budget=args.tree_budget, tree_topk=args.tree_topk, eos_token_id=eos, generator=generator)
    tokens = result.tokens[0]
    out = {
        "mode": args.mode,
        "tokens": tokens,
        "text": tok.decode(tokens) if tok is not None else None,
        "acceptance_lengths": result.acceptance_lengths[0],
        "mean_acceptance": result.mean_acceptance,
        "tokens_per_second": len(tokens) / result.seconds if result.seconds else None,
        "target_forwards": result.target_forwards,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(out["text"] if out["text"] is not None else tokens)
        print(f"[{args.mode}] {len(tokens)} tokens, {out['tokens_per_second']:.1f} tok/s, "
              f"mean acceptance {out['mean_acceptance']:.2f}, {result.target_forwards} target forwards", file=sys.stderr)
    return 0


def _named(pairs: list[str], option: str) -> dict[str, str]:
    """NAME=VALUE arguments -> {name: value}, in order."""
    named = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} takes NAME=VALUE pairs (got '{pair}')")
        if name in named:
            raise ValueError(f"{option} names {name} twice")
        named[name] = value
    return named


def cmd_bench_interleaved(args) -> int:
    from dflash_sglang.bench import format_interleaved, run_interleaved

    contenders = _named(args.interleave, "--interleave")
    levels = {}
    for name, value in _named(args.contender_concurrency or [], "--contender-concurrency").items():
        if not all(c.isdigit() for c in value.split(",")):
            return _fail([f"--contender-concurrency takes NAME=C,C,... with integers C (got '{name}={value}')"])
        levels[name] = [int(c) for c in value.split(",")]
    if len(contenders) < 2:
        return _fail([f"--interleave needs at least two contenders (got {len(contenders)})"])
    if args.repeats < 1:
        return _fail([f"--repeats takes a positive integer (got {args.repeats})"])
    if len(args.sets) != 1:
        return _fail([f"--interleave takes one prompt set (got {' '.join(args.sets)})"])
    report = run_interleaved(contenders, args.concurrency, args.repeats, contender_levels=levels,
                             prompt_set=args.sets[0], max_tokens=args.max_tokens, skip=args.skip, limit=args.limit,
                             rounds=args.rounds, min_requests=args.min_requests, tokenizer=args.tokenizer,
                             reference=args.reference, ignore_eos=not args.stop_at_eos, time_limit=args.time_limit,
                             warmup=args.warmup, progress=not args.no_progress, timeout=args.timeout,
                             flush=not args.keep_cache)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_interleaved(report))
    return 0


def cmd_bench(args) -> int:
    from dflash_sglang.bench import format_table, run_bench

    if args.interleave:
        return cmd_bench_interleaved(args)
    report = run_bench(args.url, args.sets, args.concurrency, max_tokens=args.max_tokens, skip=args.skip,
                       limit=args.limit, rounds=args.rounds, min_requests=args.min_requests, tokenizer=args.tokenizer,
                       reference=args.reference, ignore_eos=not args.stop_at_eos, time_limit=args.time_limit,
                       warmup=args.warmup, name=args.name, progress=not args.no_progress, timeout=args.timeout,
                       logprobs=args.logprobs)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return 0


def cmd_demo(args) -> int:
    from dflash_sglang.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        return run_demo(Path(tmp), max_new_tokens=args.max_new_tokens)


def cmd_regenerate(args) -> int:
    import torch

    from dflash_sglang.regenerate import regenerate_file

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stats = regenerate_file(args.target, args.prompts, args.out, args.max_new_tokens, args.batch_size, chat=args.chat,
                            ignore_eos=args.ignore_eos, dtype=dtype, device=device, server=args.server,
                            concurrency=args.concurrency, timeout=args.timeout, deadline_seconds=args.deadline_seconds)
    stats["out"] = args.out
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))
    if stats["failed"]:
        return _fail([f"{stats['failed']} of {stats['prompts']} prompts got no answer after a retry (their records are "
                      f"missing from {args.out}; first errors in the stats)"])
    return 0


def cmd_convert_gguf(args) -> int:
    import torch

    from dflash_sglang.gguf import convert_gguf

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    print(json.dumps(convert_gguf(args.gguf, args.out, dtype, args.eos_token)))
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from dflash_sglang.train import TrainConfig, train

    # Every `train` option's dest is the TrainConfig field it sets.
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train(cfg)
    print(json.dumps({"steps": result.steps, "planned_steps": result.planned_steps,
                      "stopped_by_time": result.stopped_by_time, "loss": result.final_loss,
                      "acceptance": result.acceptance, "seconds": round(result.seconds, 1),
                      "cached_sequences": result.cached_sequences, "cache_gb": round(result.cache_gb, 3),
                      "out": str(result.out)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-sglang", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random target/drafter pair in the published layouts")
    p.add_argument("--arch", required=True, choices=["qwen3", "llama", "gemma4"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the real tokenizer's (shipped alongside)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("make-shape", help="config-only target/drafter at a real model shape (for --load-format dummy)")
    p.add_argument("--shape", required=True, choices=["gemma-4-31b", "qwen3-32b"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_shape)

    p = sub.add_parser("check", help="exit 0 if the drafter fits the target, else 2 with the reasons")
    p.add_argument("--target", required=True)
    p.add_argument("--drafter", required=True)
    p.add_argument("--block-size", type=int, default=None)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="run the reference engine on one prompt")
    p.add_argument("--target", required=True)
    p.add_argument("--drafter")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt")
    group.add_argument("--prompt-ids", help="comma-separated token ids (targets without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", choices=["ar", "chain", "tree"], default="chain")
    p.add_argument("--block-size", type=int, default=None, help="default: the drafter's block_size")
    p.add_argument("--tree-budget", type=int, default=None, help="draft nodes per tree (default: block size - 1)")
    p.add_argument("--tree-topk", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="greedy benchmark of a running SGLang server (tok/s, TTFT, TPOT, acceptance)")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--sets", "--prompt-set", nargs="+", default=["math500"],
                   choices=["math500", "humaneval", "mtbench", "gsm8k"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--skip", type=int, default=0, help="leave out the first N prompts of each set")
    p.add_argument("--limit", type=int, default=None, help="use N prompts of each set (after --skip)")
    p.add_argument("--rounds", type=int, default=None,
                   help="send ROUNDS x concurrency fresh prompts per level (default: all prompts at every level)")
    p.add_argument("--min-requests", type=int, default=1, help="with --rounds: at least this many per level")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="let requests end at EOS (default: ignore EOS, every request emits --max-tokens)")
    p.add_argument("--tokenizer", default=None, help="apply this tokenizer's chat template client-side")
    p.add_argument("--reference", nargs="+", default=None,
                   help="earlier --out JSONs whose outputs must be matched (same prompt, max tokens, EOS handling)")
    p.add_argument("--logprobs", action="store_true",
                   help="reference runs (plain decoding): record the top-2 logprob margin at every output position, "
                        "so mismatches against this run carry it; streaming them slows the server, so not for timing")
    p.add_argument("--warmup", type=int, default=2, help="throw-away requests before measuring")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: later levels are skipped, running requests stopped")
    p.add_argument("--timeout", type=float, default=600.0, help="socket timeout per request, seconds")
    p.add_argument("--name", default=None, help="label for the progress lines and the JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write every figure and every output here (JSON)")
    p.add_argument("--interleave", nargs="+", metavar="NAME=URL", default=None,
                   help="measure these servers in turn instead of --url: per concurrency, --repeats times, the same "
                        "prompts on each, in an order rotated every repeat; reports per-repeat tok/s ratios to the "
                        "contenders named ar and builtin with their medians (robust to the machine's speed "
                        "drifting); outputs are checked against ar's; one prompt set, --name and --logprobs unused")
    p.add_argument("--repeats", type=int, default=5, help="with --interleave: repeats per concurrency")
    p.add_argument("--contender-concurrency", nargs="+", metavar="NAME=C,C", default=None,
                   help="with --interleave: run NAME only at these of the --concurrency levels (default: all)")
    p.add_argument("--keep-cache", action="store_true",
                   help="with --interleave: do not empty each server's radix cache (POST /flush_cache) before its "
                        "run; prompts sent again then prefill from the cache")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="reference-engine demo on the embedded pair: tok/s and acceptance per mode")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("regenerate", help="training data: the target's own greedy answers to prompts (JSONL)")
    p.add_argument("--target", required=True)
    p.add_argument("--prompts", required=True,
                   help="JSON list of token-id lists or strings, or JSONL with `prompt_ids` or `prompt`")
    p.add_argument("--out", required=True, help="JSONL: one {prompt_ids, output_ids} per prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the target's chat template")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--server", default=None, type=lambda text: [url for url in text.split(",") if url],
                   help="URL of a running SGLang server of --target (e.g. http://127.0.0.1:30100), or several, "
                        "comma-separated, that share the prompts: answers come from their /generate; --target then "
                        "only gives the tokenizer")
    p.add_argument("--concurrency", type=int, default=64, help="with --server: requests in flight, over all servers")
    p.add_argument("--timeout", type=float, default=600.0, help="with --server: seconds per request")
    p.add_argument("--deadline-seconds", type=float, default=None,
                   help="with --server: prompts not sent after this many seconds are skipped (and counted)")
    p.add_argument("--stats", default=None, help="write the run's figures here (JSON)")
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("convert-gguf", help="GGUF file -> plain HF checkpoint (safetensors, tokenizer, chat template)")
    p.add_argument("--gguf", required=True, help="the .gguf file (reading it needs the gguf and accelerate packages)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="weights as saved (float32 keeps the dequantized GGUF values exactly)")
    p.add_argument("--eos-token", default="<|im_end|>",
                   help="the token that ends an answer, written as EOS everywhere (default: ChatML's end of turn)")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("train", help="train a DFlash drafter for a frozen target (docs/training.md)")
    p.add_argument("--target", required=True)
    p.add_argument("--data", required=True, help="JSONL from `regenerate` ({prompt_ids, output_ids}) or "
                   "{input_ids, loss_mask} records")
    p.add_argument("--out", required=True, help="drafter directory (z-lab format) + checkpoint.pt + train_log.jsonl")
    p.add_argument("--drafter-config", default=None, help="config.json to train (default: derived from the target)")
    p.add_argument("--draft-layers", dest="num_draft_layers", type=int, default=5)
    p.add_argument("--target-features", dest="num_target_features", type=int, default=None,
                   help="target layers fused (default: --draft-layers)")
    p.add_argument("--init-from-target", action="store_true",
                   help="start the draft layers as copies of the target's last layers (default: from scratch)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="default: the tokenizer's mask token, else the first embedding row past the tokenizer")
    p.add_argument("--num-anchors", type=int, default=512, help="blocks per sequence (capped by its answer tokens)")
    p.add_argument("--gamma", type=float, default=None, help="loss decay (default: 7 for B=16, 5 for 10, 4 for 8)")
    p.add_argument("--soft-labels", type=float, default=0.0,
                   help="weight in [0, 1] of the target's own next-token distribution in each row's label (0: its "
                        "greedy token alone)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=None, help="default: --epochs over the data")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-seq-len", type=int, default=3072)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.04)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="target weights and autocast; drafter master weights stay float32")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between acceptance estimates (0: at the end)")
    p.add_argument("--eval-prompts", default=None,
                   help="JSON list of token-id lists (default: the prompts of the last records, held out)")
    p.add_argument("--num-eval-prompts", type=int, default=8)
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--loss-chunk-rows", type=int, default=8192,
                   help="rows of logits materialized at once in the loss (lower it for large vocabularies)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (checkpoint written)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock cap: stop at the first step boundary after it, then write the checkpoint and "
                        "drafter and run the final estimate; the cosine schedule is re-planned to the steps that fit, "
                        "from the speed of the first steps")
    p.add_argument("--target-cache-gb", type=float, default=None,
                   help="memory for the frozen target's outputs, kept after each sequence's first epoch so later "
                        "epochs skip the target (default: on CUDA half the memory free after loading; 0: off)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DFlashConfigError as e:
        return _fail(e.messages)
    except (FileNotFoundError, OSError, ValueError) as e:
        return _fail([str(e)])


if __name__ == "__main__":
    sys.exit(main())

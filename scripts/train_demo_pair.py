"""Train the embedded demo pair `dflash_sglang/data/pairs/demo/{target,drafter}` on CPU, from a clean checkout.

    .venv/bin/python scripts/train_demo_pair.py [--seed 0] [--work /tmp/dflash-demo-pair]

Corpus: the Python standard library's own sources (no test suites), split by file into training files and
held-out files. Target: a byte-level BPE tokenizer (1024 ids, `<|endoftext|>` = EOS, `<|mask|>` = the drafter's
mask token) and a 4-layer Qwen3ForCausalLM trained on the training files, shipped in bf16. Drafter: the
`dflash-sglang train` recipe on the target's own greedy continuations of prompts cut from the training files.
`heldout_prompts.json` holds prompts cut from the held-out files only; the acceptance printed at the end is the
real engine's greedy chain at block size 16 on them, with the shipped (bf16-rounded) weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAIR = REPO / "dflash_sglang" / "data" / "pairs" / "demo"

VOCAB = 1024
EOS, MASK = "<|endoftext|>", "<|mask|>"
# The demo server sends a chat request; the user's words become a comment the code model continues after.
CHAT_TEMPLATE = "{% for message in messages %}# {{ message['content'] }}\n{% endfor %}"
TARGET_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=48)
TARGET_STEPS, TARGET_BATCH, TARGET_SEQ, TARGET_LR = 1000, 16, 256, 2e-3
PROMPT_TOKENS = 48
NUM_TRAIN_PROMPTS, ANSWER_TOKENS = 2400, 160
NUM_HELDOUT_PROMPTS, EVAL_NEW_TOKENS = 16, 96
HELDOUT_EVERY = 20  # one file in 20 (by hash of its path) is held out of all training
# The recipe's defaults except where a 2-layer drafter on ~8 CPU minutes needs otherwise (docs/training.md, "The
# embedded demo pair"): start from the target's last layers, weight the first block rows more (gamma 3 instead of
# 7), and take many cheap steps (16 anchors per sequence) rather than few large ones.
DRAFTER = dict(num_draft_layers=2, num_target_features=3, init_from_target=True, gamma=3.0, block_size=16,
               num_anchors=16, epochs=10, batch_size=8, lr=1e-3, eval_every=400, num_eval_prompts=8,
               eval_max_new_tokens=64)


def corpus_files() -> tuple[list[Path], list[Path]]:
    """Standard-library sources without test suites, sorted; (training files, held-out files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    def is_held_out(path: Path) -> bool:
        return int(hashlib.sha1(str(path.relative_to(root)).encode()).hexdigest(), 16) % HELDOUT_EVERY == 0

    return [p for p in files if not is_held_out(p)], [p for p in files if is_held_out(p)]


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, MASK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read_text(p) for p in files), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, mask_token=MASK,
                                      model_max_length=2048)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(out))
    # The class name transformers 4 and 5 (and so SGLang's tokenizer manager) both resolve.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return wrapped


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of whole texts (through the `tokenizers` object: the wrapper warns on texts over 2048 tokens)."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def token_stream(tokenizer, files: list[Path]) -> torch.Tensor:
    """All files, each followed by EOS (so the target learns to stop), as one id tensor."""
    ids = encode(tokenizer, [read_text(p) for p in files])
    return torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]], dtype=torch.long)


def train_target(stream: torch.Tensor, tokenizer, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    # Untied, as in Qwen3-8B: the input row of `<|mask|>` (never an input here) then stays a small untrained vector,
    # like the padding row real drafters use as their mask embedding.
    config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         **TARGET_SHAPE)
    model = Qwen3ForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    other = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=TARGET_LR, betas=(0.9, 0.95))
    warmup = TARGET_STEPS // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / TARGET_STEPS)))))
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(TARGET_STEPS):
        starts = torch.randint(0, len(stream) - TARGET_SEQ, (TARGET_BATCH,), generator=generator)
        batch = torch.stack([stream[s: s + TARGET_SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == TARGET_STEPS - 1:
            print(f"target step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
    return model.eval()


def cut_prompts(tokenizer, files: list[Path], count: int, rng: random.Random) -> list[list[int]]:
    """`count` prompts of PROMPT_TOKENS tokens, each starting at a random line of a random file."""
    prompts = []
    while len(prompts) < count:
        lines = read_text(rng.choice(files)).splitlines(keepends=True)
        if len(lines) < 4:
            continue
        start = rng.randrange(len(lines) - 2)
        ids = encode(tokenizer, ["".join(lines[start:])])[0][:PROMPT_TOKENS]
        if len(ids) == PROMPT_TOKENS:
            prompts.append(ids)
    return prompts


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/dflash-demo-pair", help="scratch: training data, checkpoints, logs")
    args = parser.parse_args()

    from dflash_sglang.engine import DFlashEngine
    from dflash_sglang.regenerate import regenerate
    from dflash_sglang.train import TrainConfig, train

    started = time.perf_counter()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.rmtree(PAIR, ignore_errors=True)
    target_dir, drafter_dir = PAIR / "target", PAIR / "drafter"
    rng = random.Random(args.seed)

    train_files, heldout_files = corpus_files()
    print(f"corpus: {len(train_files)} training files, {len(heldout_files)} held-out files "
          f"(Python {sys.version.split()[0]} standard library)")
    tokenizer = train_tokenizer(train_files, target_dir)
    stream = token_stream(tokenizer, train_files)
    print(f"tokenizer: {VOCAB} ids; training stream {len(stream):,} tokens")

    model = train_target(stream, tokenizer, args.seed)
    # Shipped in bf16; everything below runs on exactly those (rounded) weights.
    model.to(torch.bfloat16).save_pretrained(str(target_dir))
    target_seconds = time.perf_counter() - started

    heldout = cut_prompts(tokenizer, heldout_files, NUM_HELDOUT_PROMPTS, rng)
    (PAIR / "heldout_prompts.json").write_text(json.dumps(heldout) + "\n")
    prompts = cut_prompts(tokenizer, train_files, NUM_TRAIN_PROMPTS, rng)
    records = regenerate(DFlashEngine.load(target_dir, None), prompts, ANSWER_TOKENS, 64, tokenizer.eos_token_id)
    data = work / "regenerated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    regen_seconds = time.perf_counter() - started - target_seconds

    result = train(TrainConfig(target=str(target_dir), data=str(data), out=str(work / "drafter"), seed=args.seed,
                               save_dtype="bfloat16", **DRAFTER))
    drafter_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(work / "drafter" / name, drafter_dir / name)

    engine = DFlashEngine.load(target_dir, drafter_dir, dtype=torch.float32)
    chain = engine.generate(heldout, EVAL_NEW_TOKENS, mode="chain", block_size=16)
    ar = engine.generate(heldout, EVAL_NEW_TOKENS, mode="ar")
    summary = {
        "seed": args.seed,
        "python": sys.version.split()[0],
        "seconds_total": round(time.perf_counter() - started, 1),
        "seconds_target": round(target_seconds, 1),
        "seconds_regenerate": round(regen_seconds, 1),
        "seconds_drafter": round(result.seconds, 1),
        "drafter_final_loss": round(result.final_loss, 4),
        "heldout_prompts": len(heldout),
        "heldout_mean_acceptance_b16_chain": round(chain.mean_acceptance, 3),
        "chain_equals_ar": chain.tokens == ar.tokens,
        "bytes_target": dir_bytes(target_dir),
        "bytes_drafter": dir_bytes(drafter_dir),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["chain_equals_ar"] else 1


if __name__ == "__main__":
    sys.exit(main())

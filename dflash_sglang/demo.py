"""`make demo`: on a CUDA machine with SGLang, a real server with our plugin and one OpenAI chat request;
elsewhere the reference engine on the embedded pair, every mode, losslessness checked.

The embedded pair lives in `dflash_sglang/data/pairs/demo` once a trained one is shipped; until then the demo
builds a tiny random pair and says so (a random drafter accepts ~1 token per step: it shows the machinery and
the losslessness, not a speed-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import torch

from dflash_sglang.engine import DFlashEngine
from dflash_sglang.sglang.plugin import SERVING_OURS
from dflash_sglang.verify import SamplingParams

EMBEDDED_PAIR = "data/pairs/demo"
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_ENTRY_POINT = "dflash_sglang"
# The embedded target is a small code model whose chat template turns the user's words into a comment to continue.
EMBEDDED_REQUEST = "Return the names of the files in a directory, sorted by size."
RANDOM_PAIR_REQUEST = "Write a short poem about rivers."


def embedded_pair() -> tuple[Path, Path] | None:
    root = resources.files("dflash_sglang") / EMBEDDED_PAIR
    if not root.is_dir():
        return None
    root = Path(str(root))
    return root / "target", root / "drafter"


def demo_prompts(target: Path) -> list[list[int]]:
    """The embedded pair's held-out prompts (all of them: the acceptance printed is the held-out figure), else
    four random ones."""
    prompts_file = target.parent / "heldout_prompts.json"
    if prompts_file.is_file():
        return json.loads(prompts_file.read_text())
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (5, 17, 9, 30)]


def demo_pair(workdir: Path, with_tokenizer: bool) -> tuple[Path, Path]:
    pair = embedded_pair()
    if pair is not None:
        print(f"demo pair: embedded trained pair {pair[0].parent}")
        return pair
    from dflash_sglang.tiny import make_tiny

    print("demo pair: tiny random qwen3 target + RANDOM drafter (no trained pair shipped yet): "
          "expect acceptance ~1.0; this shows losslessness, not speed")
    return make_tiny("qwen3", workdir / "pair", vocab_size=None if with_tokenizer else 512, block_size=16,
                     hidden_size=64)


def can_serve() -> bool:
    import torch

    return torch.cuda.is_available() and find_spec("sglang") is not None


def run_demo(workdir: Path, max_new_tokens: int = 96) -> int:
    if can_serve():
        return run_server_demo(workdir, max_new_tokens)
    return run_reference_demo(workdir, max_new_tokens)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def plugin_installed() -> bool:
    """SGLang finds plugins through importlib.metadata: without our entry point its builtin would serve DFLASH."""
    return any(ep.name == PLUGIN_ENTRY_POINT for ep in entry_points(group=PLUGIN_GROUP))


def run_server_demo(workdir: Path, max_new_tokens: int, port: int = 30000, startup_timeout: float = 600.0) -> int:
    """`python -m sglang.launch_server ... --speculative-algorithm DFLASH` with our plugin, one chat request."""
    from openai import OpenAI

    if not plugin_installed():
        print(f"error: no `{PLUGIN_ENTRY_POINT}` entry point in group `{PLUGIN_GROUP}` in this environment, so SGLang "
              "would serve DFLASH with its builtin worker; install this package (`pip install -e .`, which "
              "`make demo` does) and run the demo again")
        return 2
    target, drafter = demo_pair(workdir, with_tokenizer=True)
    request = EMBEDDED_REQUEST if embedded_pair() is not None else RANDOM_PAIR_REQUEST
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(target),
               "--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", str(drafter),
               "--speculative-num-draft-tokens", "16", "--attention-backend", "triton",
               "--speculative-draft-attention-backend", "triton", "--sampling-backend", "pytorch",
               # A small capped KV pool: the demo pair needs little and leaves the GPU to whatever else runs on it.
               "--mem-fraction-static", "0.85", "--max-total-tokens", "65536", "--disable-prefill-cuda-graph",
               "--port", str(port)]
    print("$ " + " ".join(command))
    log = open(workdir / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                print((workdir / "server.log").read_text()[-4000:])
                return 1
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print("server did not come up in time; see", workdir / "server.log")
                return 1
            time.sleep(2)
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        started = time.perf_counter()
        reply = client.chat.completions.create(model=str(target), max_tokens=max_new_tokens, temperature=0.0,
                                               messages=[{"role": "user", "content": request}])
        seconds = time.perf_counter() - started
        info = _get_json(f"{base}/server_info")
        # One entry per data-parallel rank; this server has one.
        accept = [s.get("avg_spec_accept_length") for s in info.get("internal_states", [])]
        accept_text = ", ".join("?" if a is None else f"{a:.2f}" for a in accept) or "not reported"
        served_by = [line for line in (workdir / "server.log").read_text().splitlines() if "dflash_sglang:" in line]
        print(reply.choices[0].message.content)
        print(f"{reply.usage.completion_tokens} tokens in {seconds:.2f}s = "
              f"{reply.usage.completion_tokens / seconds:.1f} tok/s; acceptance length {accept_text}")
        if not any(SERVING_OURS in line for line in served_by):
            print(f"error: the server log does not say that dflash_sglang's worker served DFLASH (expected "
                  f"{SERVING_OURS!r}); see {workdir / 'server.log'}")
            return 1
        print(served_by[0])
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def run_reference_demo(workdir: Path, max_new_tokens: int) -> int:
    target, drafter = demo_pair(workdir, with_tokenizer=False)
    engine = DFlashEngine.load(target, drafter, dtype=torch.float32)
    prompts = demo_prompts(target)
    print(f"{len(prompts)} prompts, {max_new_tokens} new tokens each, block 16, float32")
    params = SamplingParams()
    rows = []
    reference = None
    for mode in ("ar", "chain", "tree"):
        result = engine.generate(prompts, max_new_tokens, mode=mode, params=params)
        if mode == "ar":
            reference = result.tokens
        same = sum(a == b for a, b in zip(result.tokens, reference))
        rows.append((mode, result.num_generated / result.seconds, result.mean_acceptance, result.target_forwards,
                     f"{same}/{len(prompts)}"))
    print(f"{'mode':<6} {'tok/s':>8} {'accept':>7} {'target fwd':>10} {'== ar':>6}")
    for mode, tps, acc, fwd, same in rows:
        print(f"{mode:<6} {tps:>8.1f} {acc if mode != 'ar' else 1.0:>7.2f} {fwd:>10d} {same:>6}")
    return 0

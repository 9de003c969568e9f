"""scripts/device/x2_session.sh's `bench` subcommand (the SmolLM2 chain's second half): the benchmark arguments it
hands to bench.sh, quoting included, and the kernel tests' verdict it applies first. bench.sh itself stops at once
here (no target in the empty SMOL_DIR); the command line is read from bash's trace."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def traced_bench(tmp_path: Path, verdict: str | None, bench_args: str | None = None,
                 trained: bool = True) -> tuple[list[str], str]:
    """(bench.sh's argv as the chain would run it, the trace). trained: the chain's training ended well."""
    if trained:
        (tmp_path / "smol" / "drafter").mkdir(parents=True)
        (tmp_path / "smol" / "drafter" / "config.json").write_text("{}")
        (tmp_path / "smol" / "result").mkdir()
        (tmp_path / "smol" / "result" / "exit_code").write_text("0\n")
    ops_file = tmp_path / "reference_ops"
    if verdict is not None:
        ops_file.write_text(verdict + "\n")
    env = {**os.environ, "SMOL_DIR": str(tmp_path / "smol"), "DFLASH_REFERENCE_OPS_FILE": str(ops_file),
           "OUT": str(tmp_path / "out")}
    env.pop("X2_BENCH_ARGS", None)
    if bench_args is not None:
        env["X2_BENCH_ARGS"] = bench_args
    run = subprocess.run(["bash", "-x", str(REPO / "scripts" / "device" / "x2_session.sh"), "bench"], env=env,
                         capture_output=True, text=True, timeout=60)
    line = next(line for line in run.stderr.splitlines()
                if line.startswith(("++ bash ", "++ taskset ")) and "bench.sh" in line)
    words = shlex.split(line[len("++ "):])
    if words[0] == "taskset":  # the benchmark's share of the cores (cpu_share)
        words = words[3:]
    return words[1:], run.stdout + run.stderr


def test_default_benchmark_arguments_reach_bench_sh_as_separate_words(tmp_path):
    argv, _ = traced_bench(tmp_path, None)
    assert argv[0].endswith("scripts/device/bench.sh")
    def value(option: str) -> str:
        return argv[argv.index(option) + 1]

    assert value("--concurrency") == "1 8 32 64" and value("--tree-concurrency") == "1 8"
    assert value("--target") == str(tmp_path / "smol" / "target") and value("--budget") == "560"
    assert "--adaptive" in argv and "--profile" not in argv
    assert "--server-args" not in argv and "--spec-server-args" not in argv


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and 2 cores")
def test_the_benchmark_and_the_float32_runs_get_disjoint_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))  # what nproc counts
    split = cores * 3 // 4
    _, trace = traced_bench(tmp_path, None)
    assert f"++ taskset -c 0-{split - 1} bash " in trace
    session = REPO / "scripts" / "device" / "x2_session.sh"
    fp32 = subprocess.run(["bash", "-c", f"source <(sed -n '/^cpu_share() {{/,/^}}/p' {session}); cpu_share fp32"],
                          capture_output=True, text=True, timeout=30)
    assert fp32.stdout.strip() == f"taskset -c {split}-{cores - 1}"


@pytest.mark.parametrize("exit_code", [None, "1"])
def test_without_a_trained_drafter_the_embedded_pair_is_benchmarked(tmp_path, exit_code):
    if exit_code is not None:  # training failed after writing a drafter folder
        (tmp_path / "smol" / "drafter").mkdir(parents=True)
        (tmp_path / "smol" / "drafter" / "config.json").write_text("{}")
        (tmp_path / "smol" / "result").mkdir()
        (tmp_path / "smol" / "result" / "exit_code").write_text(exit_code + "\n")
    argv, trace = traced_bench(tmp_path, None, trained=False)
    demo = REPO / "dflash_sglang" / "data" / "pairs" / "demo"
    assert argv[argv.index("--target") + 1] == str(demo / "target")
    assert argv[argv.index("--drafter") + 1] == str(demo / "drafter")
    assert f"train_smollm2.sh exit: {exit_code or 'none'}" in trace


def test_start_hands_its_bench_args_to_the_chain(tmp_path):
    argv, _ = traced_bench(tmp_path, None, '--concurrency "1 2" --budget 100')
    assert argv[argv.index("--concurrency") + 1] == "1 2" and argv[-2:] == ["--budget", "100"]


@pytest.mark.parametrize("verdict,expected", [
    ("commit_tree,tree_verify_inputs", "DFLASH_KERNELS_REFERENCE_OPS=commit_tree,tree_verify_inputs"),
    ("all", "DFLASH_KERNELS=reference"),
])
def test_the_kernel_tests_verdict_is_applied_before_the_benchmark(tmp_path, verdict, expected):
    _, trace = traced_bench(tmp_path, verdict)
    assert f"export {expected}" in trace
    assert trace.index(f"export {expected}") < trace.index("bench.sh")


def test_no_verdict_leaves_the_kernels_on(tmp_path):
    _, trace = traced_bench(tmp_path, None)
    assert "DFLASH_KERNELS" not in trace.split("bench.sh")[0]


def test_collect_starts_the_smollm2_float32_runs_once_the_drafter_is_trained(tmp_path):
    """While `collect` waits for the benchmark, the trained pair's float32 equality runs (chain and tree 64, each
    against AR) start on GPU 0, once; a later collect copies what they wrote."""
    import time

    smol = tmp_path / "smol"
    (smol / "drafter").mkdir(parents=True)
    (smol / "drafter" / "config.json").write_text("{}")
    (smol / "result").mkdir()
    fake = tmp_path / "fake_e2e.sh"
    calls = tmp_path / "calls"
    fake.write_text('echo "$CUDA_VISIBLE_DEVICES $OUT $*" >> "' + str(calls) + '"\nmkdir -p "$OUT/e2e-x" && '
                    'echo pair=x > "$OUT/e2e-x/table.txt"\n')
    env = {**os.environ, "SMOL_DIR": str(smol), "E2E_SH": str(fake), "OUT": str(tmp_path / "out"),
           "DFLASH_REFERENCE_OPS_FILE": str(tmp_path / "none")}
    collect = ["bash", str(REPO / "scripts" / "device" / "x2_session.sh"), "collect", "--wait", "0"]

    subprocess.run(collect, env=env, capture_output=True, text=True, timeout=60)
    assert not calls.exists()  # no drafter yet: training has not ended
    (smol / "result" / "exit_code").write_text("0\n")
    run = subprocess.run(collect, env=env, capture_output=True, text=True, timeout=60)
    assert "float32 equality runs started on GPU 0" in run.stdout
    deadline = time.time() + 10
    while time.time() < deadline and (not calls.exists() or len(calls.read_text().splitlines()) < 2):
        time.sleep(0.1)
    lines = sorted(calls.read_text().splitlines())
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"0 {smol / 'fp32'} --pair {smol} --name smollm2-")
        assert "--skip-builtin" in line and "--budget 450" in line
        # then tau per prompt set on our server, 24 prompts each, stopping at EOS
        assert "--then python3 -m dflash_sglang bench --url http://127.0.0.1:$OURS_PORT" in line
        assert "--sets math500 humaneval mtbench gsm8k --limit 24" in line and "--stop-at-eos" in line
    assert "--tree-budget 64 --tree-topk 4" in [line for line in lines if "smollm2-tree64" in line][0]
    run = subprocess.run(collect, env=env, capture_output=True, text=True, timeout=60)
    assert "started" not in run.stdout and len(calls.read_text().splitlines()) == 2  # once
    assert (tmp_path / "out" / "fp32" / "e2e-x" / "table.txt").exists()


def test_gpu0_is_refused_while_the_variant_drafter_trains_there(tmp_path):
    smol = tmp_path / "smol"
    (smol / "result").mkdir(parents=True)
    (smol / "variant.args").write_text("--draft-layers 5\n")
    env = {**os.environ, "SMOL_DIR": str(smol), "OUT": str(tmp_path / "out"),
           "DFLASH_REFERENCE_OPS_FILE": str(tmp_path / "none")}
    run = subprocess.run(["bash", str(REPO / "scripts" / "device" / "x2_session.sh"), "gpu0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "GPU 0 trains the variant drafter (--draft-layers 5)" in run.stderr

"""Per-op kernel gating: scripts/device/kernel_gate.py names the ops whose GPU tests failed (from the JUnit report
of kernel_tests.sh), and `DFLASH_KERNELS_REFERENCE_OPS` sends just those ops to their references."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dflash_sglang.kernels import build_draft_tree, jit

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "scripts" / "device" / "kernel_gate.py"
# Run apart from the gating tests by kernel_tests.sh: it checks error reports, not results.
NOT_GATING = {("test_context_kv", "test_library_errors_reach_python_as_exceptions")}


def gate_table() -> dict:
    sys.path.insert(0, str(GATE.parent))
    try:
        import kernel_gate
    finally:
        sys.path.remove(str(GATE.parent))
    return kernel_gate.GPU_TEST_OPS


def gpu_tests(module: str) -> set[tuple[str, str]]:
    tree = ast.parse((REPO / "tests" / f"{module}.py").read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any("gpu" in ast.unparse(d) for d in node.decorator_list):
            found.add((module, node.name))
    return found


def test_every_gating_gpu_test_names_the_ops_it_condemns():
    table = gate_table()
    tests = gpu_tests("test_kernels") | gpu_tests("test_context_kv")
    assert tests - NOT_GATING == set(table), "a GPU kernel test is missing from kernel_gate.GPU_TEST_OPS (or stale)"
    assert {op for ops in table.values() for op in ops} == set(jit.OPS)


def test_ops_listed_in_jit_are_the_ones_the_wrappers_ask_for():
    called = set()
    for path in (REPO / "dflash_sglang").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "use_kernel" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                called.add(node.args[0].value)
    assert called == set(jit.OPS)


def junit(*cases: str) -> str:
    return f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'


def case(module: str, name: str, outcome: str = "") -> str:
    body = {"": "", "failure": '<failure message="x">x</failure>', "error": '<error message="x">x</error>'}[outcome]
    return f'<testcase classname="tests.{module}" name="{name}" time="0.1">{body}</testcase>'


def gate(tmp_path: Path, report: str | None) -> str:
    path = tmp_path / "pytest_gpu.xml"
    if report is not None:
        path.write_text(report)
    result = subprocess.run([sys.executable, str(GATE), str(path)], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


PASSED = case("test_kernels", "test_build_kernel_matches_reference[1-1-1-1-continuous]")


@pytest.mark.parametrize("cases,expected", [
    ([PASSED], ""),
    ([PASSED, case("test_kernels", "test_commit_kernel_matches_reference[64-65-16]", "failure")], "commit_tree"),
    ([case("test_kernels", "test_verify_inputs_kernel_matches_reference[3-5-9-7]", "failure"),
      case("test_context_kv", "test_kernel_matches_reference[1-64-dtype0]", "failure")],
     "tree_verify_inputs,context_kv_norm_rope,context_kv_to_pool"),
    ([PASSED, case("test_context_kv", "test_pool_kernel_matches_reference[1-64-dtype0]", "failure")],
     "context_kv_to_pool"),
    ([case("test_kernels", "test_ops_capture_in_a_cuda_graph", "failure")],
     "build_draft_tree,tree_verify_inputs,verify_tree_greedy,verify_tree_sampling,commit_tree,chain_block,"
     "chain_accept_greedy"),
    ([PASSED, case("test_kernels", "test_chain_kernels_match_reference[1-1]", "error")], "all"),
    ([case("test_kernels", "test_something_new", "failure")], "all"),
    ([], "all"),
])
def test_gate_names_the_failed_ops_or_all(tmp_path, cases, expected):
    assert gate(tmp_path, junit(*cases)) == expected


def test_gate_says_all_without_a_report(tmp_path):
    assert gate(tmp_path, None) == "all"
    assert gate(tmp_path, "<testsuites><testsuite") == "all"


def test_listed_ops_take_the_reference_even_when_the_kernels_are_required(monkeypatch, caplog):
    monkeypatch.setattr(jit, "_logged", set())
    monkeypatch.setenv("DFLASH_KERNELS", "cuda")
    monkeypatch.setenv("DFLASH_KERNELS_REFERENCE_OPS", "commit_tree, build_draft_tree")
    with caplog.at_level(logging.INFO, logger="dflash_sglang.kernels"):
        tree = build_draft_tree(torch.tensor([1]), torch.zeros(1, 2, 1), torch.ones(1, 2, 1, dtype=torch.long),
                                torch.tensor([3]), 2)
    assert tree.tokens.tolist() == [[1, 1, 1]]
    assert "build_draft_tree: torch reference (listed in DFLASH_KERNELS_REFERENCE_OPS)" in caplog.text


def test_an_unknown_op_in_the_list_is_an_error_naming_the_ops(monkeypatch):
    monkeypatch.setenv("DFLASH_KERNELS_REFERENCE_OPS", "commit_accepted")
    with pytest.raises(ValueError, match=r"unknown ops \['commit_accepted'\]; the ops are build_draft_tree"):
        jit.use_kernel("commit_tree", torch.zeros(1))

"""Which kernels may serve after their GPU tests: read the JUnit report of `kernel_tests.sh` and name the ops whose
correctness tests failed, so that only those run their torch reference (`DFLASH_KERNELS_REFERENCE_OPS`) and the
others keep serving. Prints `all` when the report cannot say which (no report, a collection or setup error, a
failed test this table does not know), else the failed ops, comma-separated (empty when none failed).

    python scripts/device/kernel_gate.py out/pytest_gpu.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from dflash_sglang.kernels.jit import OPS

TREE_AND_CHAIN_OPS = tuple(op for op in OPS if not op.startswith("context_kv"))
# Both context K/V ops run one kernel (its pool mode only changes where rows are stored): a failure of the plain
# op's tests condemns both.
CONTEXT_KV_OPS = ("context_kv_norm_rope", "context_kv_to_pool")
# (test module, test function) -> the ops a failure of it condemns. A graph capture failure could come from any
# op it captures.
GPU_TEST_OPS = {
    ("test_kernels", "test_build_kernel_matches_reference"): ("build_draft_tree",),
    ("test_kernels", "test_greedy_kernel_matches_reference"): ("verify_tree_greedy",),
    ("test_kernels", "test_sampling_kernel_matches_reference"): ("verify_tree_sampling",),
    ("test_kernels", "test_sampling_kernel_law"): ("verify_tree_sampling",),
    ("test_kernels", "test_commit_kernel_matches_reference"): ("commit_tree",),
    ("test_kernels", "test_verify_inputs_kernel_matches_reference"): ("tree_verify_inputs",),
    ("test_kernels", "test_chain_kernels_match_reference"): ("chain_block", "chain_accept_greedy"),
    ("test_kernels", "test_ops_capture_in_a_cuda_graph"): TREE_AND_CHAIN_OPS,
    ("test_context_kv", "test_kernel_matches_reference"): CONTEXT_KV_OPS,
    ("test_context_kv", "test_kernel_matches_reference_on_odd_head_dims_and_unaligned_caches"): CONTEXT_KV_OPS,
    ("test_context_kv", "test_head_dims_the_kernel_cannot_run_take_the_reference"): CONTEXT_KV_OPS,
    ("test_context_kv", "test_kernel_captures_in_a_cuda_graph"): CONTEXT_KV_OPS,
    ("test_context_kv", "test_pool_kernel_matches_reference"): ("context_kv_to_pool",),
    ("test_context_kv", "test_pool_kernel_captures_in_a_cuda_graph"): ("context_kv_to_pool",),
}


def failed_ops(report: Path) -> str:
    """`all`, or the comma-separated ops whose tests failed (in `jit.OPS` order)."""
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError):
        return "all"
    cases = list(root.iter("testcase"))
    if not cases:
        return "all"
    ops: set[str] = set()
    for case in cases:
        if case.find("error") is not None:
            return "all"
        if case.find("failure") is None:
            continue
        module = case.get("classname", "").rsplit(".", 1)[-1]
        function = case.get("name", "").split("[", 1)[0]
        condemned = GPU_TEST_OPS.get((module, function))
        if condemned is None:
            return "all"
        ops.update(condemned)
    return ",".join(op for op in OPS if op in ops)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(failed_ops(Path(sys.argv[1])))

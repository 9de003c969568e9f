"""The chain's context K/V write as a capture tail hook of the target's verify graphs (verify_context.py).

The worker-level behaviour (the drafter reads only committed context, eager and graph verifies alike) is tested in
test_sglang_plugin.py with MarkovWorld; here, the hook's own decisions and SGLang 0.5.16's side of the contract.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from types import SimpleNamespace

import pytest
import torch

from dflash_sglang.sglang.verify_context import VerifyGraphContext, row_positions


class RecordingDrafter:
    def __init__(self):
        self.writes = []

    def write_context_kv(self, features, positions, cache_loc, kv_pool):
        self.writes.append((features, positions, cache_loc, kv_pool))


def verify_batch(mode="TARGET_VERIFY", bs=3, width=4):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=getattr(ForwardMode, mode), batch_size=bs,
                           seq_lens=torch.tensor([7, 0, 30], dtype=torch.int32)[:bs],
                           out_cache_loc=torch.arange(1, bs * width + 1))


def context(widths=(4, 1)):
    drafter = RecordingDrafter()
    return VerifyGraphContext(drafter, SimpleNamespace(token_to_kv_pool="draft pool"), widths), drafter


def test_the_hook_writes_every_verify_row_at_its_slot_and_position():
    verify, drafter = context()
    batch = verify_batch()
    features = torch.randn(12, 8)
    verify.capture_hook(object(), SimpleNamespace(hidden_states=features), batch, 12)
    [(written, positions, slots, pool)] = drafter.writes
    assert written is features and slots is batch.out_cache_loc and pool == "draft pool"
    assert positions.tolist() == [7, 8, 9, 10, 0, 1, 2, 3, 30, 31, 32, 33] and positions.dtype == torch.int64
    assert verify.written_in_graph(4, ran_graph=True)
    assert not verify.written_in_graph(4, ran_graph=False)  # an eager verify writes after its forward
    assert not verify.written_in_graph(1, ran_graph=True)  # width 1's graphs were not captured with it


@pytest.mark.parametrize("mode,num_tokens", [("DECODE", 12), ("EXTEND", 12), ("TARGET_VERIFY", 3 * 16)])
def test_the_hook_leaves_other_graphs_alone(mode, num_tokens):
    """Other forward modes, and verify widths it was not given (a tree's), capture nothing of ours."""
    verify, drafter = context()
    verify.capture_hook(object(), SimpleNamespace(hidden_states=torch.zeros(num_tokens, 8)),
                        verify_batch(mode), num_tokens)
    assert drafter.writes == [] and not verify.written_in_graph(16, True) and not verify.written_in_graph(4, True)


def test_graphs_captured_without_features_leave_the_write_to_the_step():
    verify, drafter = context()
    verify.capture_hook(object(), SimpleNamespace(hidden_states=torch.zeros(12, 8)), verify_batch(), 12)
    verify.capture_hook(object(), SimpleNamespace(hidden_states=None), verify_batch(), 12)  # a recapture
    assert len(drafter.writes) == 1 and not verify.written_in_graph(4, ran_graph=True)


def test_row_positions_follow_the_lengths():
    assert row_positions(torch.tensor([3, 9]), 1).tolist() == [3, 9]
    assert row_positions(torch.tensor([3, 9]), 3).tolist() == [3, 4, 5, 9, 10, 11]


def test_sglang_runs_a_runners_tail_hooks_inside_each_captured_forward():
    """SGLang 0.5.16's side: every ModelRunner starts with an empty `capture_tail_hooks` list, and the decode-graph
    runner's captured forward calls each hook as hook(graph_runner, output, forward_batch, num_tokens) after the
    model's forward, so what the hook launches is recorded in the graph."""
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    assert "self.capture_tail_hooks = []" in inspect.getsource(ModelRunner.__init__)
    tree = ast.parse(textwrap.dedent(inspect.getsource(DecodeCudaGraphRunner.capture_one_shape)))
    [run_once] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "run_once"]
    loops = [node for node in ast.walk(run_once) if isinstance(node, ast.For)
             and ast.unparse(node.iter) == "self.model_runner.capture_tail_hooks"]
    assert len(loops) == 1
    [call] = [node for node in ast.walk(loops[0]) if isinstance(node, ast.Call)]
    assert [ast.unparse(arg) for arg in call.args] == ["self", "out", "forward_batch", "num_tokens"]
    assert ast.unparse(run_once.body[-1]) == "return out"


def test_sglang_captures_the_targets_graphs_after_building_our_worker():
    """The worker registers its hook in __init__, which SGLang 0.5.16 runs (maybe_init_draft_worker) before it sizes
    the KV pools and captures the target's graphs (init_all_cuda_graphs: the target worker's first)."""
    from sglang.srt.managers.scheduler import Scheduler

    def calls(function) -> list[str]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        found = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        return [ast.unparse(node.func) for node in sorted(found, key=lambda node: (node.lineno, node.col_offset))]

    order = calls(Scheduler.init_model_worker)
    assert order.index("self.maybe_init_draft_worker") < order.index("self.init_memory_pools")
    assert order.index("self.init_memory_pools") < order.index("self.init_all_cuda_graphs")
    assert calls(Scheduler.init_all_cuda_graphs)[:2] == ["self.tp_worker.init_cuda_graphs",
                                                          "self.draft_worker.init_cuda_graphs"]

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
from test_sglang_plugin import drafter_configs, sglang_drafter


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
    assert not verify.written_in_graph(4, ran_graph=True, decode=True)


def test_the_hook_writes_a_plain_decode_graphs_row_at_the_committed_length():
    """A DECODE batch's lengths count the token it computes: the row sits at length - 1."""
    verify, drafter = context()
    batch = verify_batch("DECODE", width=1)
    batch.seq_lens = torch.tensor([8, 1, 31], dtype=torch.int32)
    verify.capture_hook(object(), SimpleNamespace(hidden_states=torch.randn(3, 8)), batch, 3)
    [(_, positions, slots, _)] = drafter.writes
    assert positions.tolist() == [7, 0, 30] and slots is batch.out_cache_loc
    assert verify.written_in_graph(1, ran_graph=True, decode=True)
    assert not verify.written_in_graph(1, ran_graph=True)  # width 1's verify graphs were not captured with it


@pytest.mark.parametrize("mode,num_tokens,widths", [("DECODE", 3, (4,)), ("EXTEND", 12, (4, 1)),
                                                     ("TARGET_VERIFY", 3 * 16, (4, 1))])
def test_the_hook_leaves_other_graphs_alone(mode, num_tokens, widths):
    """Other forward modes, and widths it was not given (a tree's verify; plain steps when the server has none),
    capture nothing of ours."""
    verify, drafter = context(widths)
    verify.capture_hook(object(), SimpleNamespace(hidden_states=torch.zeros(num_tokens, 8)),
                        verify_batch(mode), num_tokens)
    assert drafter.writes == [] and verify.captured == {}


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


@pytest.mark.gpu
@pytest.mark.usefixtures("sglang_tp1")
@pytest.mark.parametrize("pool_kind", ["sglang pool", "pool subclass"])
def test_the_context_write_replays_from_a_captured_graph(tmp_path, monkeypatch, cuda, pool_kind):
    """On the GPU: the hook captured into a CUDA graph, then replayed over fresh lengths, slots and features,
    leaves the drafter's KV pool as an eager `write_context_kv` of the same rows leaves another, for SGLang's own
    pool and for a pool type the drafter does not special-case (its per-layer `set_kv_buffer` stores)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    class PoolSubclass(MHATokenToKVPool):
        pass

    model, state = sglang_drafter(tmp_path, drafter_configs()["qwen3"], monkeypatch)
    model.load_weights(state.items())
    model = model.to(cuda, torch.bfloat16)
    model.post_load_weights()  # the stacked context projection, rebuilt from the moved weights
    cfg, kv_heads = model.cfg, model.layers[0].self_attn.num_kv_heads
    pool_type = MHATokenToKVPool if pool_kind == "sglang pool" else PoolSubclass

    def new_pool():
        return pool_type(size=512, page_size=1, dtype=torch.bfloat16, head_num=kv_heads, head_dim=cfg.head_dim,
                         layer_num=cfg.num_hidden_layers, device="cuda", enable_memory_saver=False,
                         enable_alt_stream=False)

    bs, width, g = 3, 4, torch.Generator().manual_seed(4)
    features = torch.zeros(bs * width, cfg.num_target_features * cfg.hidden_size, dtype=torch.bfloat16, device=cuda)
    lens = torch.ones(bs, dtype=torch.int32, device=cuda)
    slots = torch.zeros(bs * width, dtype=torch.int64, device=cuda)
    batch = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=bs, seq_lens=lens, out_cache_loc=slots)
    graph_pool = new_pool()
    verify = VerifyGraphContext(model, SimpleNamespace(token_to_kv_pool=graph_pool), (width, 1))
    out = SimpleNamespace(hidden_states=features)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # SGLang's warm-ups before a capture
            verify.capture_hook(None, out, batch, bs * width)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        verify.capture_hook(None, out, batch, bs * width)

    for _ in range(3):
        lens.copy_(torch.randint(1, 200, (bs,), generator=g))
        slots.copy_(torch.randperm(511, generator=g)[: bs * width] + 1)
        features.copy_(torch.randn(features.shape, generator=g))
        graph.replay()
        eager_pool = new_pool()
        model.write_context_kv(features, row_positions(lens, width), slots, eager_pool)
        torch.cuda.synchronize()
        for got, want in zip(graph_pool.k_buffer + graph_pool.v_buffer, eager_pool.k_buffer + eager_pool.v_buffer,
                             strict=True):
            assert torch.equal(got[slots], want[slots]) and bool(want[slots].abs().sum() > 0)

"""The SGLang glue on CPU, against the real sglang 0.5.16 package: plugin discovery and dispatch, the version
gate, the drafter on SGLang layers (weights, context K/V) against the reference drafter, acceptance and the
draft head against plain references. GPU behaviour (the step itself, CUDA graphs) is covered by
scripts/device/e2e.sh."""

from __future__ import annotations

import inspect
import logging
import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from dflash_sglang.config import DFlashConfigError, parse_drafter_config  # noqa: E402
from dflash_sglang.drafter import DFlashDrafter  # noqa: E402
from dflash_sglang import kernels  # noqa: E402
from dflash_sglang.sglang import accept, compat, plugin  # noqa: E402
from dflash_sglang.sglang.draft_head import GreedyDraftHead, select_across_shards, shard_argmax  # noqa: E402
from dflash_sglang.tiny import drafter_config_dict, make_tiny, random_drafter_state  # noqa: E402


# --------------------------------------------------------------------------------------------- plugin


@pytest.fixture(scope="module")
def spec_algorithm():
    """SpeculativeAlgorithm after SGLang loaded every installed plugin (hooks are process-wide)."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    load_plugins()
    return SpeculativeAlgorithm


def test_entry_point_is_discovered_by_sglang():
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    plugins = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert "dflash_sglang" in plugins
    func, dist = plugins["dflash_sglang"]
    assert func is plugin.register
    assert dist == "dflash-sglang"


def test_hook_is_applied_to_create_worker(spec_algorithm):
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = HookRegistry._hooks[plugin.CREATE_WORKER_TARGET]
    assert [(kind, hook) for kind, hook, _ in hooks] == [(HookType.AROUND, plugin.create_worker_hook)]
    assert plugin.CREATE_WORKER_TARGET in HookRegistry._patched


@pytest.mark.parametrize("algorithm, disabled, expected", [("DFLASH", "", 4 + 2 * 16), ("DFLASH", "1", 4 + 16),
                                                          ("EAGLE", "", 4 + 16)])
def test_dflash_rows_hold_the_whole_kv_reservation(spec_algorithm, monkeypatch, algorithm, disabled, expected):
    from sglang.srt.mem_cache import kv_cache_configurator

    monkeypatch.setenv(plugin.DISABLE_ENV, disabled)
    server_args = SimpleNamespace(speculative_algorithm=algorithm, speculative_num_draft_tokens=16,
                                  max_speculative_num_draft_tokens=16, page_size=1)
    assert kv_cache_configurator.get_req_to_token_extra_context_len(server_args) == expected


def _aborted_after_an_overshooting_step(max_new_tokens: int, appended: list[int]):
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req("soak-0", "a prompt", [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens))
    req.output_ids.extend(appended)  # one verify step's accepted tokens, appended before the finish check
    req.to_finish = FINISH_ABORT("client disconnected")
    req.update_finish_state(len(appended))
    return req


@pytest.mark.parametrize("serving_ours, reported", [(True, [5, 6]), (False, [5, 6, 7])])
def test_an_aborted_request_reports_at_most_max_new_tokens(spec_algorithm, monkeypatch, serving_ours, reported):
    monkeypatch.setattr(plugin, "_serving_ours", serving_ours)
    req = _aborted_after_an_overshooting_step(2, [5, 6, 7])
    assert req.finished()
    assert list(req.output_ids_through_stop) == reported  # SGLang's own behaviour when the builtin serves


def test_an_aborted_request_within_its_limit_keeps_every_token(spec_algorithm, monkeypatch):
    monkeypatch.setattr(plugin, "_serving_ours", True)
    req = _aborted_after_an_overshooting_step(8, [5, 6, 7])
    assert req.finished_len is None and list(req.output_ids_through_stop) == [5, 6, 7]


def test_tree_flags_parse_through_sglangs_own_server_args(spec_algorithm, monkeypatch):
    """After load_plugins(), SGLang's parser takes our tree flags and from_cli_args relays them before it resolves
    the speculative arguments (SGLang's own resolution then stops: no accelerator here, no model "m" anywhere)."""
    import argparse

    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative import dflash_utils

    from dflash_sglang.sglang import adaptive_width, draft_head, tree_mode, verify_attention, verify_prefill

    envs = (tree_mode.BUDGET_ENV, tree_mode.TOPK_ENV, adaptive_width.ADAPTIVE_ENV, verify_attention.SPLITKV_ENV,
            draft_head.FP8_HEAD_ENV, verify_prefill.ENV)
    for name in envs:
        monkeypatch.setenv(name, "")  # recorded, so the hook's own writes are undone too (delenv of an unset one is not)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--speculative-algorithm", "DFLASH",
                              "--speculative-dflash-tree-budget", "31", "--speculative-dflash-topk", "4",
                              "--speculative-dflash-adaptive", "--speculative-dflash-verify-splitkv",
                              "--speculative-dflash-draft-head-fp8", "--speculative-dflash-verify-prefill"])
    assert verify_prefill.setting_from_env() is None  # the worker's choice unless the flag is given
    with pytest.raises(Exception):  # noqa: B017 -- what stops SGLang after our hook ran depends on the machine
        ServerArgs.from_cli_args(args)
    assert args.speculative_num_draft_tokens == 32 and verify_prefill.setting_from_env() is True
    assert tree_mode.settings_from_env() == tree_mode.TreeSettings(budget=31, topk=4)
    assert adaptive_width.adaptive_from_env() and verify_attention.splitkv_from_env() is True
    assert draft_head.fp8_head_from_env()
    assert dflash_utils.resolve_dflash_verify_mask_policy(object())[1] is True


@pytest.mark.parametrize("switch", ["verify-splitkv", "verify-prefill"])
@pytest.mark.parametrize("given, want", [("", None), ("--speculative-dflash-", True),
                                         ("--no-speculative-dflash-", False)])
def test_the_verify_switches_are_three_way(spec_algorithm, monkeypatch, switch, given, want):
    """Unset, the split-KV verify and the verify-graph prefill are the worker's choice (on where they apply); the
    flag insists, --no-... refuses; the scheduler processes read which through the environment."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    from dflash_sglang.sglang import verify_attention, verify_prefill

    env, read = {"verify-splitkv": (verify_attention.SPLITKV_ENV, verify_attention.splitkv_from_env),
                 "verify-prefill": (verify_prefill.ENV, verify_prefill.setting_from_env)}[switch]
    monkeypatch.setenv(env, "")
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--speculative-algorithm", "DFLASH"]
                             + ([given + switch] if given else []))
    with pytest.raises(Exception):  # noqa: B017 -- what stops SGLang after our hook ran depends on the machine
        ServerArgs.from_cli_args(args)
    assert read() is want
    monkeypatch.setenv(env, "maybe")
    with pytest.raises(DFlashConfigError, match=f"{env}='maybe': set it to one of 1, "):
        read()


def test_dflash_is_served_by_our_worker(spec_algorithm, monkeypatch, caplog):
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    from dflash_sglang.sglang.worker import DFlashWorker

    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        worker_cls = spec_algorithm.from_string("DFLASH").create_worker(SimpleNamespace())
    assert worker_cls is DFlashWorker
    assert issubclass(worker_cls, BaseSpecWorker)
    assert [r.getMessage() for r in caplog.records if r.name == plugin.__name__][0].startswith(plugin.SERVING_OURS)


def test_kill_switch_serves_the_builtin(spec_algorithm, monkeypatch, caplog):
    from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2

    monkeypatch.setenv(plugin.DISABLE_ENV, "1")
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        worker_cls = spec_algorithm.DFLASH.create_worker(SimpleNamespace())
    assert worker_cls is DFlashWorkerV2
    messages = [r.getMessage() for r in caplog.records if r.name == plugin.__name__]
    assert messages == [f"{plugin.SERVING_BUILTIN} because {plugin.DISABLE_ENV}=1"]


@pytest.mark.parametrize(
    "name, module, attr",
    [("EAGLE", "sglang.srt.speculative.eagle_worker_v2", "EAGLEWorkerV2"),
     ("NGRAM", "sglang.srt.speculative.ngram_worker", "NGRAMWorker")],
)
def test_other_algorithms_fall_through_to_sglang(spec_algorithm, monkeypatch, caplog, name, module, attr):
    # The originals import GPU-only modules; stand-ins prove the original code path ran untouched.
    stand_in = type(attr, (), {})
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{attr: stand_in}))
    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        worker_cls = spec_algorithm.from_string(name).create_worker(SimpleNamespace(enable_multi_layer_eagle=False))
    assert worker_cls is stand_in
    assert not [r for r in caplog.records if r.name == plugin.__name__]


def test_other_sglang_versions_are_refused(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(compat, "installed_sglang_version", lambda: "0.5.23")
    before = list(HookRegistry._hooks[plugin.CREATE_WORKER_TARGET])
    with pytest.raises(compat.UnsupportedSGLangVersion, match=r"sglang==0\.5\.16 only, found sglang 0\.5\.23"):
        plugin.register()
    assert HookRegistry._hooks[plugin.CREATE_WORKER_TARGET] == before


@pytest.mark.parametrize("found, ok", [("0.5.16", True), ("0.5.16+cu130", True), ("0.5.16.post1", False),
                                       ("0.5.15", False), ("0.5.23", False), ("dev", False)])
def test_version_gate(found, ok):
    if ok:
        compat.check_sglang_version(found)
    else:
        with pytest.raises(compat.UnsupportedSGLangVersion):
            compat.check_sglang_version(found)


def test_installed_sglang_is_the_supported_one():
    compat.check_sglang_version()


def test_worker_and_model_modules_import_on_cpu():
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    from dflash_sglang.sglang import draft_model, worker

    assert issubclass(worker.DFlashWorker, BaseSpecWorker)
    assert draft_model.DRAFT_ARCHITECTURE == "DFlashDraftModel"


def test_use_as_dflash_draft_model_overrides_the_registry(monkeypatch):
    from sglang.srt.models.registry import ModelRegistry

    from dflash_sglang.sglang.draft_model import DFlashSGLangDrafter, use_as_dflash_draft_model

    monkeypatch.setitem(ModelRegistry.models, "DFlashDraftModel", ModelRegistry.models.get("DFlashDraftModel"))
    use_as_dflash_draft_model()
    assert ModelRegistry.resolve_model_cls(["DFlashDraftModel"])[0] is DFlashSGLangDrafter


# ------------------------------------------------------------------------------------ worker helpers


def test_extend_positions():
    from dflash_sglang.sglang.worker import extend_positions

    positions = extend_positions([0, 5, 2], [3, 1, 4], "cpu")
    assert positions.tolist() == [0, 1, 2, 5, 2, 3, 4, 5]


def test_planning_lengths_prefer_the_host_mirror():
    from dflash_sglang.sglang.worker import planning_seq_lens

    state = SimpleNamespace(reserved_seq_lens_cpu=torch.tensor([40, 50]))
    lens, total = planning_seq_lens(SimpleNamespace(seq_lens_cpu=torch.tensor([3, 7])), state, 16)
    assert lens.tolist() == [19, 23] and total == 42
    lens, total = planning_seq_lens(SimpleNamespace(seq_lens_cpu=None), state, 16)
    assert lens.tolist() == [40, 50] and total == 90


def test_next_draft_state_is_sglangs_carrier():
    from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2

    from dflash_sglang.sglang.worker import next_draft_state

    state = next_draft_state(torch.tensor([5, 6], dtype=torch.int32), torch.tensor([10, 12], dtype=torch.int32))
    assert isinstance(state, DFlashDraftInputV2)
    assert state.bonus_tokens.dtype == torch.int64 and state.new_seq_lens.tolist() == [10, 12]
    assert state.topk_p.shape == (2, 0) and state.hidden_states.shape == (2, 0)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_pairs")
    return {arch: make_tiny(arch, root / arch, seed=1, vocab_size=512) for arch in ("qwen3", "gemma4")}


def startup_args(target, drafter, block=16, window=None):
    return SimpleNamespace(
        speculative_num_draft_tokens=block, speculative_draft_model_path=str(drafter),
        speculative_draft_model_revision=None, model_path=str(target), revision=None,
        speculative_draft_window_size=window,
    )


def fake_target_runner(target_dir):
    from transformers import AutoConfig

    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=AutoConfig.from_pretrained(target_dir), is_draft_model=False,
                                     linear_attn_registry_result=None),
        model=SimpleNamespace(lm_head=SimpleNamespace(weight=torch.zeros(4, 4))),
    )


def test_startup_accepts_a_matching_pair(tiny_dirs):
    from dflash_sglang.sglang.worker import check_startup

    target, drafter = tiny_dirs["gemma4"]
    config, info = check_startup(startup_args(target, drafter), fake_target_runner(target))
    assert config.final_logit_softcapping == 30.0 and info.vocab_size == 512


def test_startup_refuses_a_mismatched_pair_with_every_reason(tiny_dirs):
    from dflash_sglang.sglang.worker import check_startup

    target, _ = tiny_dirs["gemma4"]
    _, drafter = tiny_dirs["qwen3"]
    with pytest.raises(DFlashConfigError) as err:
        check_startup(startup_args(target, drafter, window=64), fake_target_runner(target))
    text = str(err.value)
    assert "`num_target_layers` = 4 but the target has 6 layers" in text
    assert "--speculative-draft-window-size is not supported" in text


def test_startup_refuses_the_split_kv_verify_off_the_triton_backend(tiny_dirs):
    from dflash_sglang.sglang.worker import check_startup

    target, drafter = tiny_dirs["qwen3"]
    args = startup_args(target, drafter)
    args.attention_backend, args.decode_attention_backend = "fa3", None
    assert check_startup(args, fake_target_runner(target))[1].model_type == "qwen3"
    with pytest.raises(DFlashConfigError, match=re.escape("--speculative-dflash-verify-splitkv replaces SGLang's")):
        check_startup(args, fake_target_runner(target), splitkv=True)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(hidden_size=96), "`hidden_size` = 96 but the target's is"),
    (lambda c: c.update(vocab_size=1000), "`vocab_size` = 1000 but the target's is 512"),
    (lambda c: c["dflash_config"].update(target_layer_ids=[0, 9]), "has ids [9] outside the target's layers"),
    (lambda c: c["dflash_config"].pop("mask_token_id"), "`dflash_config.mask_token_id` is missing"),
])
def test_the_worker_stops_at_startup_on_a_mismatched_drafter_before_building_anything(tiny_dirs, tmp_path,
                                                                                      monkeypatch, change, message):
    """Issue 7's bad pairs through the worker's own constructor, as SGLang's scheduler calls it: our message, raised
    before the draft worker (its model, KV pool, CUDA graphs) is built."""
    import json
    import shutil

    from dflash_sglang.sglang import adaptive_width, tree_mode
    from dflash_sglang.sglang import worker as worker_module

    target, drafter = tiny_dirs["qwen3"]
    shutil.copytree(drafter, tmp_path / "drafter")
    cfg = json.loads((tmp_path / "drafter" / "config.json").read_text())
    change(cfg)
    (tmp_path / "drafter" / "config.json").write_text(json.dumps(cfg))

    def built(*args, **kwargs):
        raise AssertionError("the draft worker was built for a refused pair")

    monkeypatch.setattr(worker_module, "build_draft_worker", built)
    monkeypatch.setattr(worker_module, "use_as_dflash_draft_model", built)
    for name in (tree_mode.BUDGET_ENV, adaptive_width.ADAPTIVE_ENV):  # a chain server, whatever ran before
        monkeypatch.setenv(name, "")
    args = startup_args(target, tmp_path / "drafter")
    target_worker = SimpleNamespace(model_runner=fake_target_runner(target), device="cpu")
    with pytest.raises(DFlashConfigError, match=re.escape(message)):
        worker_module.DFlashWorker(args, gpu_id=0, ps=None, nccl_port=0, target_worker=target_worker)


def test_startup_refuses_the_last_target_layer_where_sglang_cannot_capture_it(tiny_dirs, tmp_path):
    import json
    import shutil

    from dflash_sglang.sglang.worker import check_startup

    target, drafter = tiny_dirs["qwen3"]
    shutil.copytree(drafter, tmp_path / "drafter")
    cfg = json.loads((tmp_path / "drafter" / "config.json").read_text())
    cfg["dflash_config"]["target_layer_ids"] = [0, 3]
    (tmp_path / "drafter" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DFlashConfigError, match="includes the target's last layer 3, whose output SGLang cannot capture"):
        check_startup(startup_args(target, tmp_path / "drafter"), fake_target_runner(target))


def test_startup_refuses_a_quantized_head(tiny_dirs):
    from dflash_sglang.sglang.worker import check_startup

    target, drafter = tiny_dirs["qwen3"]
    runner = fake_target_runner(target)
    runner.model.lm_head.weight = torch.zeros(4, 4, dtype=torch.int8)
    with pytest.raises(DFlashConfigError, match="unquantized `lm_head.weight`"):
        check_startup(startup_args(target, drafter), runner)


# ------------------------------------------------------------------------ drafter on SGLang layers


def sglang_drafter(tmp_path, raw: dict, monkeypatch, quant_config=None):
    """Our SGLang drafter built from a config.json on disk, with the reference drafter's random weights."""
    import json

    import sglang.srt.layers.rotary_embedding.base as rope_base
    from transformers import AutoConfig

    from dflash_sglang.sglang.draft_model import DFlashSGLangDrafter

    # SGLang's RoPE picks a device kernel at construction; on this CPU box take its CPU path.
    monkeypatch.setattr(rope_base, "_is_cpu", True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = DFlashSGLangDrafter(AutoConfig.from_pretrained(tmp_path), quant_config=quant_config)
    state = random_drafter_state(raw, seed=5, std=0.2)
    if raw.get("use_gemma_norm"):
        state = {k: (v + 0.3 * torch.randn_like(v)) if "norm" in k else v for k, v in state.items()}
    return model, state


class RecordingPool:
    def __init__(self):
        self.writes = {}

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, k_scale, v_scale):
        self.writes[layer.layer_id] = (loc.clone(), cache_k.clone(), cache_v.clone())


def drafter_configs():
    base = dict(hidden=32, vocab=64, num_target_layers=6, draft_layers=3, block_size=8, mask_token_id=63,
                window=8, num_features=3)
    qwen = drafter_config_dict("qwen3", **base)
    gemma = drafter_config_dict("gemma4", **base)
    gemma_norm = dict(gemma, use_gemma_norm=True, output_multiplier=0.5)
    yarn = dict(qwen, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    yarn_factor = dict(qwen, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                           "attention_factor": 0.8})
    linear = dict(qwen, rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True)
    return {"qwen3": qwen, "gemma4": gemma, "gemma_norm": gemma_norm, "yarn": yarn, "yarn_attention_factor": yarn_factor,
            "linear_bias": linear}


@pytest.mark.parametrize("name", list(drafter_configs()))
def test_context_kv_matches_the_reference_drafter(sglang_tp1, tmp_path, monkeypatch, name):
    raw = drafter_configs()[name]
    model, state = sglang_drafter(tmp_path, raw, monkeypatch)
    assert_context_kv_matches_the_reference(model, state, raw)


def assert_context_kv_matches_the_reference(model, state, raw):
    """Load `state` (z-lab names, `model.` prefix, a shipped lm_head to skip), then the context K/V of random
    features at scattered positions equals the reference drafter's."""
    prefixed = {f"model.{k}": v for k, v in state.items()}
    model.load_weights(list(prefixed.items()) + [("lm_head.weight", torch.zeros(64, 32))])
    reference = DFlashDrafter(parse_drafter_config(raw))
    reference.load_state_dict(state)

    cfg = reference.cfg
    num_tokens = 7
    features = torch.randn(num_tokens, cfg.num_target_features * cfg.hidden_size)
    positions = torch.tensor([0, 1, 2, 3, 40, 41, 300])
    slots = torch.tensor([11, 12, 13, 0, 15, 0, 17])
    pool = RecordingPool()
    model.write_context_kv(features, positions, slots, pool)
    ref_keys, ref_values = reference.context_kv(features[None], positions[None])
    assert sorted(pool.writes) == list(range(cfg.num_hidden_layers))
    for i, (loc, keys, values) in pool.writes.items():
        assert torch.equal(loc, slots)
        torch.testing.assert_close(keys, ref_keys[i][0].transpose(0, 1), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(values, ref_values[i][0].transpose(0, 1), atol=2e-5, rtol=2e-5)


def test_block_embedding_is_the_targets_times_the_drafters_scale(sglang_tp1, tmp_path, monkeypatch):
    raw = drafter_configs()["qwen3"]
    raw["dflash_config"]["input_embedding_scale"] = 2.5
    model, _ = sglang_drafter(tmp_path, raw, monkeypatch)
    assert model.cfg.input_embedding_scale == 2.5
    ids = torch.tensor([3, 63, 63, 7])
    with pytest.raises(RuntimeError, match="use_target_embedding"):
        model.embed_block(ids)
    target_embed = torch.nn.Embedding(64, 32).to(torch.bfloat16)
    model.use_target_embedding(target_embed)
    assert "target_embed" not in dict(model.named_modules())  # the target's weights, not the drafter's
    embeds = model.embed_block(ids)
    assert embeds.dtype == model.fc.weight.dtype
    torch.testing.assert_close(embeds, (target_embed(ids) * 2.5).to(embeds.dtype))


@pytest.mark.parametrize("name", ["qwen3", "gemma_norm", "linear_bias"])
def test_context_kv_into_sglangs_plain_pool_stores_what_its_per_layer_stores_store(sglang_tp1, tmp_path, monkeypatch,
                                                                                    caplog, name):
    """SGLang's own MHATokenToKVPool (on CPU): the one-op path into its buffers leaves them as its per-layer
    `set_kv_buffer` leaves a pool it does not recognize (a subclass), slot for slot, and says which path it took."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    class OtherPool(MHATokenToKVPool):
        pass

    raw = drafter_configs()[name]
    model, state = sglang_drafter(tmp_path, raw, monkeypatch)
    model.load_weights(state.items())
    cfg = model.cfg
    kv_heads = model.layers[0].self_attn.num_kv_heads

    def pool(cls):
        made = cls(size=64, page_size=1, dtype=torch.float32, head_num=kv_heads, head_dim=cfg.head_dim,
                   layer_num=cfg.num_hidden_layers, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
        for buffer in made.k_buffer + made.v_buffer:
            buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(9)))
        return made

    features = torch.randn(7, cfg.num_target_features * cfg.hidden_size)
    positions = torch.tensor([0, 1, 2, 3, 40, 41, 300])
    slots = torch.tensor([11, 12, 13, 0, 15, 0, 17])
    plain, other = pool(MHATokenToKVPool), pool(OtherPool)
    assert model.pool_layers(plain, torch.float32) is not None
    with caplog.at_level("INFO", logger="dflash_sglang.sglang.draft_model"):
        model.write_context_kv(features, positions, slots, plain)
        model.write_context_kv(features, positions, slots, other)
        model.write_context_kv(features, positions, slots, other)
    assert [r.getMessage() for r in caplog.records] == [
        "dflash_sglang: context K/V stored through OtherPool.set_kv_buffer, layer by layer"]
    for got, want in zip(plain.k_buffer + plain.v_buffer, other.k_buffer + other.v_buffer, strict=True):
        assert torch.equal(got[1:], want[1:])  # slot 0, where dropped rows land, holds any one of them
    written = torch.zeros(65, dtype=torch.bool)
    written[slots] = True
    fresh = pool(MHATokenToKVPool)
    assert all(torch.equal(got[~written], was[~written]) for got, was in zip(plain.k_buffer, fresh.k_buffer))
    assert not any(torch.equal(got[slots[0]], was[slots[0]]) for got, was in zip(plain.k_buffer, fresh.k_buffer))


def test_weights_land_in_the_stacked_sglang_parameters(sglang_tp1, tmp_path, monkeypatch):
    raw = drafter_configs()["linear_bias"]
    model, state = sglang_drafter(tmp_path, raw, monkeypatch)
    model.load_weights(state.items())
    params = dict(model.named_parameters())
    attn = "layers.1.self_attn."
    torch.testing.assert_close(params[attn + "qkv_proj.weight"],
                               torch.cat([state[attn + p + "_proj.weight"] for p in "qkv"]))
    torch.testing.assert_close(params[attn + "qkv_proj.bias"], torch.cat([state[attn + p + "_proj.bias"] for p in "qkv"]))
    torch.testing.assert_close(params["layers.1.mlp.gate_up_proj.weight"],
                               torch.cat([state["layers.1.mlp.gate_proj.weight"], state["layers.1.mlp.up_proj.weight"]]))
    torch.testing.assert_close(params["fc.weight"], state["fc.weight"])


def test_attention_kinds_follow_the_config(sglang_tp1, tmp_path, monkeypatch):
    from sglang.srt.layers.radix_attention import AttentionType

    raw = dict(drafter_configs()["gemma4"], layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raw["dflash_config"] = dict(raw["dflash_config"], causal=None)
    model, _ = sglang_drafter(tmp_path, raw, monkeypatch)
    kinds = [(layer.self_attn.attn.attn_type, layer.self_attn.attn.sliding_window_size) for layer in model.layers]
    assert kinds == [(AttentionType.DECODER, 7), (AttentionType.ENCODER_ONLY, -1), (AttentionType.DECODER, 7)]
    assert model.get_attention_sliding_window_size() == 7

    bidirectional = dict(raw, is_causal=False)
    model, _ = sglang_drafter(tmp_path, bidirectional, monkeypatch)
    assert {layer.self_attn.attn.attn_type for layer in model.layers} == {AttentionType.ENCODER_ONLY}


def test_bad_checkpoints_fail_with_the_tensor_name(sglang_tp1, tmp_path, monkeypatch):
    raw = drafter_configs()["qwen3"]
    model, state = sglang_drafter(tmp_path, raw, monkeypatch)
    del state["layers.0.mlp.up_proj.weight"]
    state["fc.weight"] = torch.zeros(32, 64)
    with pytest.raises(DFlashConfigError) as err:
        model.load_weights(state.items())
    assert err.value.messages == [
        "drafter weights: `fc.weight` has shape (32, 64), expected (32, 96)",
        "drafter weights: tensor `fc.weight` is missing",
        "drafter weights: tensor `layers.0.mlp.up_proj.weight` is missing",
    ]


# ----------------------------------------------------------------------------------------- acceptance


def reference_greedy(candidates, predicted):
    accept_len, bonus = [], []
    for cand, pred in zip(candidates.tolist(), predicted.tolist()):
        n = 0
        while n + 1 < len(cand) and cand[n + 1] == pred[n]:
            n += 1
        accept_len.append(n)
        bonus.append(pred[n])
    return accept_len, bonus


def reference_sampling(candidates, probs, uniforms, race):
    accept_len, bonus = [], []
    for b in range(candidates.shape[0]):
        n, block = 0, candidates.shape[1]
        while n + 1 < block and uniforms[b, n] < probs[b, n, candidates[b, n + 1]]:
            n += 1
        weights = probs[b, n].clone()
        if n + 1 < block:
            weights[candidates[b, n + 1]] = 0.0
        accept_len.append(n)
        bonus.append(int((weights / race[b]).argmax()))
    return accept_len, bonus


def random_chain(seed, bs=64, block=5, vocab=7):
    g = torch.Generator().manual_seed(seed)
    predicted = torch.randint(vocab, (bs, block), generator=g)
    candidates = predicted.roll(1, dims=1)
    # Break the chain at random depths so every accept length occurs.
    breaks = torch.rand((bs, block), generator=g) < 0.3
    candidates = torch.where(breaks, torch.randint(vocab, (bs, block), generator=g), candidates)
    return candidates, predicted, g


@pytest.mark.parametrize("seed", range(5))
def test_greedy_accept_matches_a_plain_loop(seed):
    candidates, predicted, g = random_chain(seed)
    seq_lens = torch.randint(0, 100, (candidates.shape[0],), generator=g)
    step = kernels.chain_accept_greedy(candidates, predicted, seq_lens)
    assert (step.accept_len.tolist(), step.bonus.tolist()) == reference_greedy(candidates, predicted)
    assert step.accept_len.dtype == step.commit_lens.dtype == torch.int32 and step.bonus.dtype == torch.int64
    assert torch.equal(step.commit_lens, step.accept_len + 1)
    assert torch.equal(step.new_seq_lens, seq_lens + step.accept_len + 1)
    for b, kept in enumerate(step.accept_len.tolist()):
        assert step.emitted[b].tolist() == candidates[b, 1: kept + 1].tolist() + [int(step.bonus[b])] + [0] * (
            candidates.shape[1] - kept - 1)


def test_chain_block_reads_each_requests_reserved_slots():
    g = torch.Generator().manual_seed(3)
    req_to_token = torch.randint(1, 50_000, (6, 40), generator=g, dtype=torch.int32)
    seq_lens, rows, bonus = torch.tensor([0, 7, 20]), torch.tensor([4, 0, 2]), torch.tensor([11, 12, 13])
    block = kernels.chain_block(bonus, seq_lens, rows, req_to_token, 5, mask_token_id=99)
    for b in range(3):
        assert block.block_ids[b].tolist() == [int(bonus[b])] + [99] * 4
        assert block.positions[b].tolist() == list(range(int(seq_lens[b]), int(seq_lens[b]) + 5))
        assert block.slots[b].tolist() == req_to_token[rows[b], seq_lens[b]: seq_lens[b] + 5].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_sampling_accept_matches_a_plain_loop(seed):
    candidates, _, g = random_chain(seed)
    bs, block = candidates.shape
    probs = torch.softmax(3 * torch.randn((bs, block, 7), generator=g), dim=-1)
    probs[0, 0] = torch.nn.functional.one_hot(candidates[0, 1], 7).float()  # a certain accept
    uniforms = torch.rand((bs, block - 1), generator=g)
    race = torch.empty((bs, 7)).exponential_(generator=g)
    accept_len, bonus = accept.sampling_accept_with(candidates, probs, uniforms, race)
    assert (accept_len.tolist(), bonus.tolist()) == reference_sampling(candidates, probs, uniforms, race)


def test_sampling_accept_with_one_hot_rows_is_greedy():
    candidates, predicted, g = random_chain(11)
    probs = torch.nn.functional.one_hot(predicted, 7).float()
    greedy = kernels.chain_accept_greedy(candidates, predicted, torch.zeros(len(candidates)))
    for _ in range(3):
        sampled = accept.sampling_accept(candidates, probs, generator=g)
        assert torch.equal(sampled[0], greedy.accept_len) and torch.equal(sampled[1], greedy.bonus)


def test_sampling_accept_emits_the_target_distribution():
    """Two rows, fixed drafts: the first emitted token ~ p0, and after an accepted d1 the next ~ p1."""
    n, vocab = 200_000, 5
    g = torch.Generator().manual_seed(0)
    p0 = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05])
    p1 = torch.tensor([0.3, 0.05, 0.05, 0.5, 0.1])
    probs = torch.stack([p0, p1, torch.full((vocab,), 1 / vocab)])[None].expand(n, -1, -1)
    candidates = torch.tensor([[0, 1, 3]]).expand(n, -1)
    accept_len, bonus = accept.sampling_accept(candidates, probs, generator=g)
    out = kernels.chain_step(candidates, accept_len, bonus, torch.zeros(n)).emitted
    first = torch.bincount(out[:, 0], minlength=vocab) / n
    assert (first - p0).abs().max() < 0.006
    second = out[accept_len >= 1, 1]
    assert (torch.bincount(second, minlength=vocab) / second.numel() - p1).abs().max() < 0.01



def test_sampling_accept_of_a_plain_step_samples_the_first_row():
    """Width 1 (an adaptive plain step) has no drafts: nothing is accepted and the bonus ~ row 0."""
    n, vocab = 200_000, 5
    g = torch.Generator().manual_seed(1)
    p0 = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05])
    accept_len, bonus = accept.sampling_accept(torch.zeros((n, 1), dtype=torch.long), p0.expand(n, 1, -1), generator=g)
    assert accept_len.tolist() == [0] * n
    assert (torch.bincount(bonus, minlength=vocab) / n - p0).abs().max() < 0.006

def reference_filter(row, temperature, top_k, top_p, min_p):
    probs = torch.softmax(row.double() / temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    keep, mass = set(), 0.0
    for rank, i in enumerate(order):
        if rank < top_k and mass <= top_p and probs[i] >= min_p * probs[order[0]]:
            keep.add(i)
        mass += float(probs[i])
    kept = torch.tensor([float(probs[i]) if i in keep else 0.0 for i in range(len(probs))], dtype=torch.float64)
    return kept / kept.sum()


def test_filtered_probs_match_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn((6, 11), generator=g)
    temperatures = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7, 1.0])
    top_ks = torch.tensor([11, 3, 11, 1, 5, 11], dtype=torch.int32)
    top_ps = torch.tensor([1.0, 1.0, 0.6, 1.0, 0.8, 0.3])
    min_ps = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2])
    probs = accept.filtered_probs(logits, temperatures, top_ks, top_ps, min_ps)
    for r in range(6):
        expected = reference_filter(logits[r], float(temperatures[r]), int(top_ks[r]), float(top_ps[r]), float(min_ps[r]))
        torch.testing.assert_close(probs[r].double(), expected, atol=1e-6, rtol=1e-5)
    plain = accept.filtered_probs(logits, temperatures)
    torch.testing.assert_close(plain, torch.softmax(logits / temperatures[:, None], dim=-1))


def test_chain_step_layout():
    candidates = torch.tensor([[9, 1, 2, 3], [9, 4, 5, 6], [9, 7, 8, 0]])
    step = kernels.chain_step(candidates, torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([20, 21, 22]),
                              torch.tensor([5, 6, 7]))
    assert step.emitted.tolist() == [[20, 0, 0, 0], [4, 5, 21, 0], [7, 8, 0, 22]]
    assert step.commit_lens.tolist() == [1, 3, 4] and step.new_seq_lens.tolist() == [6, 9, 11]


# ------------------------------------------------------------------------------------------ draft head


def test_shard_argmax_across_shards_is_the_full_argmax_with_first_max_ties():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn((9, 8), generator=g)
    weight = torch.randn((12, 8), generator=g)
    weight[7] = weight[2]  # a tie across shards: the lower id must win
    rows[0] = weight[2] * 10
    full = (rows @ weight.T).argmax(dim=-1)
    maxima, ids = zip(*(shard_argmax(rows, weight[lo:lo + 4]) for lo in (0, 4, 8)))
    ids = [i + lo for i, lo in zip(ids, (0, 4, 8))]
    assert torch.equal(select_across_shards(torch.stack(maxima), torch.stack(ids)), full)
    assert full[0] == 2


def test_draft_head_matches_the_reference_drafter_logits():
    raw = drafter_config_dict("gemma4", hidden=16, vocab=40, num_target_layers=6, draft_layers=2, block_size=4,
                              mask_token_id=39, window=8)
    raw["dflash_config"]["output_multiplier"] = 3.0
    reference = DFlashDrafter(parse_drafter_config(raw))
    lm_head = torch.nn.Linear(16, 40, bias=False)
    hidden = 4 * torch.randn(3 * 4, 16)
    head = GreedyDraftHead(torch.cat([lm_head.weight.data, torch.zeros(8, 16)]), 4, num_rows=40,
                           logit_multiplier=3.0, softcap=30.0)
    expected = reference.logits(hidden.view(3, 4, 16)[:, 1:], lm_head, 30.0).argmax(dim=-1)
    assert torch.equal(head(hidden), expected.reshape(-1))


def test_fp8_rows_keep_each_rows_scale_and_e4m3_precision():
    from dflash_sglang.sglang.draft_head import FP8_MAX, Fp8HeadWeight, quantize_rows_fp8

    x = torch.randn(37, 48) * torch.logspace(-3, 3, 37)[:, None]  # rows six decades apart
    x[5] = 0
    q, scale = quantize_rows_fp8(x)
    back = q.float() * scale[:, None]
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float().abs().amax(-1)[x.abs().amax(-1) > 0],
                                                          torch.full((36,), FP8_MAX))
    assert torch.equal(back[5], torch.zeros(48))
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, or of the row's smallest normal step near zero.
    assert ((back - x).abs() <= x.abs() / 16 + scale[:, None] * 2.0 ** -6).all()
    # Quantized a chunk of rows at a time, the same as all at once.
    chunked = Fp8HeadWeight.quantize(x, chunk_rows=8)
    assert torch.equal(chunked.qweight.float(), q.float()) and torch.equal(chunked.scale, scale)


@pytest.mark.parametrize("topk", [None, 3])
def test_fp8_draft_head_drafts_the_argmax_and_top_k_of_its_quantized_logits(topk):
    """The heads take an FP8 weight as they take a tensor: on the CPU its logits are the float32 products of the
    dequantized rows and weight (the reference the FP8 GEMM is tested against on the GPU), padding rows past
    num_rows never drafted, close to the bf16 head's logits."""
    from dflash_sglang.sglang.draft_head import (Fp8HeadWeight, TopkDraftHead, drafter_logits, quantize_rows_fp8)

    torch.manual_seed(7)
    weight = torch.cat([torch.randn(40, 16), 100 * torch.ones(8, 16)])  # 8 padding rows that would win if read
    hidden = 4 * torch.randn(3 * 4, 16)
    fp8 = Fp8HeadWeight.quantize(weight)
    rows = hidden.view(3, 4, 16)[:, 1:].reshape(-1, 16)
    q_rows, row_scale = quantize_rows_fp8(rows)
    dequantized = (q_rows.float() * row_scale[:, None]) @ (fp8.qweight.float() * fp8.scale[:, None])[:40].T
    want = 30.0 * torch.tanh(2.0 * dequantized / 30.0)
    got = drafter_logits(rows, fp8, 2.0, 30.0, num_rows=40)
    assert got.shape == (9, 40) and torch.allclose(got, want, atol=1e-5)
    exact, approx = drafter_logits(rows, weight, num_rows=40), drafter_logits(rows, fp8, num_rows=40)
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()  # e4m3 rounds each value by up to 1/16
    common = dict(num_rows=40, logit_multiplier=2.0, softcap=30.0)
    if topk is None:
        assert torch.equal(GreedyDraftHead(fp8, 4, **common)(hidden), want.argmax(-1))
    else:
        logprobs, ids = TopkDraftHead(fp8, 4, topk=topk, **common)(hidden)
        values, want_ids = want.topk(topk, dim=-1)
        assert torch.equal(ids, want_ids) and (ids < 40).all()
        assert torch.allclose(logprobs, values - torch.logsumexp(want, -1, keepdim=True), atol=1e-5)


def test_fp8_draft_head_is_refused_at_startup_off_an_fp8_gpu_and_on_unaligned_shapes(tiny_dirs):
    """Before the draft worker is built: the CPU has no FP8 GEMM, and a 12-wide head fits no FP8 GEMM shape."""
    from dflash_sglang.sglang.draft_head import FP8_HEAD_FLAG
    from dflash_sglang.sglang.worker import check_startup

    target, drafter = tiny_dirs["qwen3"]
    runner = fake_target_runner(target)
    check_startup(startup_args(target, drafter), runner)  # the pair itself is fine
    runner.model.lm_head.weight = torch.randn(40, 12)
    with pytest.raises(DFlashConfigError) as refused:
        check_startup(startup_args(target, drafter), runner, fp8_head=True)
    assert refused.value.messages == [
        f"{FP8_HEAD_FLAG} needs FP8 matrix products (a CUDA GPU of compute capability 8.9 or newer, e.g. L40S, "
        f"H100, H200, B200); the head is on cpu: drop {FP8_HEAD_FLAG}",
        f"{FP8_HEAD_FLAG} needs the head's rows and hidden size in multiples of 16 (FP8 GEMM shapes); this head is "
        f"[40, 12]: drop {FP8_HEAD_FLAG}"]


@pytest.mark.parametrize("tree_budget", [None, 7])
def test_make_draft_head_builds_the_fp8_head_over_the_whole_padded_head(tiny_dirs, tree_budget):
    """fp8=True: the head's weight is an FP8 copy of lm_head.weight, its row count taken from the bf16 weight (an
    FP8 copy has no `shape`); chain and tree heads draft what its logits say."""
    from dflash_sglang.sglang.draft_head import Fp8HeadWeight, TopkDraftHead, drafter_logits
    from dflash_sglang.sglang.tree_mode import TreeSettings
    from dflash_sglang.sglang.worker import check_startup, make_draft_head

    target, drafter = tiny_dirs["qwen3"]
    config, info = check_startup(startup_args(target, drafter), fake_target_runner(target))
    lm_head = SimpleNamespace(weight=torch.randn(info.vocab_size, config.hidden_size))
    tree = tree_budget and TreeSettings(budget=tree_budget, topk=2)
    head = make_draft_head(lm_head, config, info, 4, tree, fp8=True)
    assert isinstance(head.weight, Fp8HeadWeight) and head.num_rows == info.vocab_size
    assert isinstance(head, TopkDraftHead) == bool(tree)
    hidden = torch.randn(2 * 4, config.hidden_size)
    rows = hidden.view(2, 4, -1)[:, 1:].reshape(-1, config.hidden_size)
    logits = drafter_logits(rows, head.weight, head.logit_multiplier, head.softcap, head.num_rows)
    drafted = head(hidden)
    assert torch.equal(drafted[1][:, 0] if tree else drafted, logits.argmax(-1))


def test_the_fp8_head_flag_reaches_the_workers_startup_check(tiny_dirs, monkeypatch):
    from dflash_sglang.sglang import worker as worker_module
    from dflash_sglang.sglang.draft_head import FP8_HEAD_ENV, FP8_HEAD_FLAG
    from dflash_sglang.sglang.tree_mode import BUDGET_ENV

    def built(*args, **kwargs):
        raise AssertionError("the draft worker was built for a refused FP8 head")

    monkeypatch.setattr(worker_module, "build_draft_worker", built)
    monkeypatch.setenv(BUDGET_ENV, "")
    monkeypatch.setenv(FP8_HEAD_ENV, "1")
    target, drafter = tiny_dirs["qwen3"]
    target_worker = SimpleNamespace(model_runner=fake_target_runner(target), device="cpu")
    with pytest.raises(DFlashConfigError, match=re.escape(f"{FP8_HEAD_FLAG} needs FP8 matrix products")):
        worker_module.DFlashWorker(startup_args(target, drafter), gpu_id=0, ps=None, nccl_port=0,
                                   target_worker=target_worker)


# ------------------------------------------------------------------ the worker's step, with fake runners


class MarkovWorld:
    """A target whose greedy next token depends only on the current one (`table`), a drafter that guesses the
    chain right up to a position-dependent depth, one-hot states through an identity head. The worker's step
    runs on CPU against these fakes exactly as it would against SGLang's runners.

    The target's features are (position, token) per row; the drafter's KV pool keeps the last pair written to each
    slot, and every drafter forward checks that the context it reads (each request's committed positions) holds
    the committed tokens. With `graphs`, a verify runs the target's capture tail hooks on its forward batch, as a
    replay of a graph captured with them does."""

    def __init__(self, vocab=32, block=6, mask=31, seed=0, graphs=False):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.block, self.mask, self.graphs = vocab, block, mask, graphs
        self.table = torch.randperm(vocab - 1, generator=g)  # never maps to the mask id
        self.req_to_token = torch.arange(4 * 512).view(4, 512) + 1  # slot = req * 512 + position + 1
        self.context_writes = []
        self.draft_pool = {}  # slot -> (position, token) last written there
        self.requests = {}  # req_to_token row -> (first decoded position, tokens emitted so far), by run_decode
        self.capture_tail_hooks = []

    def chain(self, token, length):
        out = []
        for _ in range(length):
            token = int(self.table[token])
            out.append(token)
        return out

    def onehot(self, ids):
        return torch.nn.functional.one_hot(ids.long(), self.vocab).float()

    def draft_forward(self, fb):
        """One-hot rows of a guess of the chain that is wrong at a position-dependent depth; at that depth the
        right token is the drafter's second choice (a tree's rank-1 branch recovers it, a chain cannot)."""
        ids, positions = fb.input_ids.view(-1, self.block), fb.positions.view(-1, self.block)
        assert torch.equal(ids[:, 1:], torch.full_like(ids[:, 1:], self.mask))
        for row, start in zip(fb.req_pool_indices.tolist(), positions[:, 0].tolist()):
            self.assert_committed_context(row, start)
        hidden = []
        for anchor, start in zip(ids[:, 0].tolist(), positions[:, 0].tolist()):
            right = self.chain(anchor, self.block - 1)
            guess = list(right)
            wrong_at = (start * 7) % (self.block + 2)  # 0..block+1: some blocks are fully right
            if wrong_at < self.block - 1:
                guess[wrong_at] = (guess[wrong_at] + 1) % (self.vocab - 1)
            rows = self.onehot(torch.tensor([anchor] + guess))
            rows[1:] += 0.5 * self.onehot(torch.tensor(right)) * (torch.tensor(guess) != torch.tensor(right))[:, None]
            hidden.append(rows)
        hidden = 10 * torch.cat(hidden)  # a confident drafter: first choices near probability 1
        return SimpleNamespace(logits_output=SimpleNamespace(hidden_states=hidden), can_run_graph=False)

    def verify_forward(self, batch=None, forward_batch=None, is_verify=False):
        assert batch is None and is_verify
        logits = 10 * self.onehot(self.table[forward_batch.input_ids])
        features = torch.zeros((forward_batch.input_ids.shape[0], 2 * self.vocab))
        features[:, 0], features[:, 1] = forward_batch.positions, forward_batch.input_ids
        out = SimpleNamespace(next_token_logits=logits, hidden_states=features)
        if self.graphs:
            for hook in self.capture_tail_hooks:
                hook(None, out, forward_batch, forward_batch.input_ids.shape[0])
        return SimpleNamespace(logits_output=out, can_run_cuda_graph=self.graphs)

    def write_context_kv(self, features, positions, cache_loc, kv_pool):
        kept = cache_loc != 0  # slot 0 absorbs the rows that are not committed
        assert torch.equal(features[kept, 0].long(), positions[kept])
        self.context_writes.append((positions.clone(), cache_loc.clone()))
        for slot, position, token in zip(cache_loc[kept].tolist(), positions[kept].tolist(),
                                         features[kept, 1].long().tolist()):
            self.draft_pool[slot] = (position, token)

    def assert_committed_context(self, row: int, end: int) -> None:
        """The drafter's context of request row `row` holds its committed tokens at every decoded position < end."""
        if row not in self.requests:
            return
        start, tokens = self.requests[row]
        for position in range(start, end):
            slot = int(self.req_to_token[row, position])
            assert self.draft_pool.get(slot) == (position, tokens[position - start]), (row, position)


@pytest.fixture(params=["eager verify", "verify graphs"])
def markov_worker(monkeypatch, request):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    from dflash_sglang.sglang.worker import DFlashWorker

    world = MarkovWorld(graphs=request.param == "verify graphs")
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)  # a CUDA-only call
    monkeypatch.setattr(
        ForwardBatch, "init_new",
        classmethod(lambda cls, batch, runner, **kw: SimpleNamespace(
            input_ids=batch.input_ids, out_cache_loc=batch.out_cache_loc, seq_lens=batch.seq_lens,
            req_pool_indices=batch.req_pool_indices,
            batch_size=batch.seq_lens.shape[0], forward_mode=batch.forward_mode, spec_info=batch.spec_info,
            capture_hidden_mode=kw["capture_hidden_mode"],
            # SGLang's: the spec_info's positions, else a decode batch's lengths minus the token it computes.
            positions=batch.seq_lens - 1 if batch.spec_info is None else batch.spec_info.positions,
            custom_mask=None if batch.spec_info is None else batch.spec_info.custom_mask)),
    )
    worker = DFlashWorker.__new__(DFlashWorker)
    raw = drafter_config_dict("qwen3", hidden=world.vocab, vocab=world.vocab, num_target_layers=4, draft_layers=1,
                              block_size=world.block, mask_token_id=world.mask, window=8)
    draft_runner = SimpleNamespace(forward=world.draft_forward, token_to_kv_pool=None)
    draft_model = SimpleNamespace(write_context_kv=world.write_context_kv)
    worker.__dict__.update(
        _target_worker=SimpleNamespace(forward_batch_generation=world.verify_forward),
        model_runner=SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=world.req_to_token)),
        draft_runner=draft_runner,
        draft_model=draft_model,
        verify_context=verify_context_with_hook(world, draft_model, draft_runner, (world.block, 1)),
        verify_resources={},
        device="cpu",
        block_size=world.block,
        tree=None,
        drafter_config=parse_drafter_config(raw),
        draft_head=GreedyDraftHead(torch.eye(world.vocab), world.block, num_rows=world.vocab),
        block_offsets=torch.arange(world.block),
    )
    worker.draft_block_spec = None
    return worker, world


def verify_context_with_hook(world, draft_model, draft_runner, widths):
    """The worker's VerifyGraphContext, its hook registered with the target as DFlashWorker.__init__ does."""
    from dflash_sglang.sglang.verify_context import VerifyGraphContext

    context = VerifyGraphContext(draft_model, draft_runner, widths)
    world.capture_tail_hooks[:] = [context.capture_hook]
    return context


def run_decode(worker, world, sampling_info=None, steps=8):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.sglang.worker import next_draft_state

    prompt_lens, first_tokens = torch.tensor([5, 17, 0]), torch.tensor([3, 11, 20])
    batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE, seq_lens=prompt_lens.clone(), seq_lens_cpu=prompt_lens.clone(),
        seq_lens_sum=int(prompt_lens.sum()), req_pool_indices=torch.tensor([2, 0, 3]), input_ids=None,
        return_logprob=False, out_cache_loc=None, sampling_info=sampling_info, spec_info=next_draft_state(first_tokens, prompt_lens),
    )
    emitted, published, commits = [[t] for t in first_tokens.tolist()], [], []
    world.requests = dict(zip(batch.req_pool_indices.tolist(), zip(prompt_lens.tolist(), emitted)))
    for _ in range(steps):
        result = worker.forward_batch_generation(batch, on_publish=published.append)
        accept_lens, tokens = result.accept_lens.tolist(), result.next_token_ids.view(3, -1)
        for i, n in enumerate(accept_lens):
            emitted[i] += tokens[i, :n].tolist()
        commits.append(accept_lens)
        assert batch.forward_mode == ForwardMode.DECODE and batch.spec_info is not None  # fields restored
        # What SGLang's scheduler does with the result between steps (non-overlap path).
        batch.spec_info = result.next_draft_input
        batch.seq_lens, batch.seq_lens_cpu = result.new_seq_lens, result.new_seq_lens.clone()
        assert torch.equal(published[-1], result.new_seq_lens)
    return prompt_lens, first_tokens, emitted, commits, batch


def test_decode_steps_emit_the_targets_greedy_chain(markov_worker):
    worker, world = markov_worker
    prompt_lens, first_tokens, emitted, commits, batch = run_decode(worker, world)
    for i, tokens in enumerate(emitted):
        assert tokens == [int(first_tokens[i])] + world.chain(int(first_tokens[i]), len(tokens) - 1)
    assert {n for step in commits for n in step} > {1}  # drafts were accepted, at varying depths
    assert max(n for step in commits for n in step) == world.block
    assert batch.seq_lens.tolist() == [p + sum(step[i] for step in commits) for i, p in enumerate(prompt_lens.tolist())]


def assert_context_holds_every_committed_token(world, batch):
    """After the run, as before each drafter forward: every committed position's slot holds its token's context."""
    for row, end in zip(batch.req_pool_indices.tolist(), batch.seq_lens.tolist()):
        world.assert_committed_context(row, end)


@pytest.mark.parametrize("tree", [False, True])
def test_context_kv_keeps_its_positions_when_the_target_shifts_them_in_place(markov_worker, tree):
    worker, world = in_tree_mode(*markov_worker) if tree else markov_worker
    plain = world.verify_forward

    def shifting(batch=None, forward_batch=None, is_verify=False):
        out = plain(batch, forward_batch, is_verify)
        forward_batch.positions += 1  # what SGLang's Gemma 4 forward does when it runs eagerly (gemma4_mm.py)
        return out

    worker._target_worker = SimpleNamespace(forward_batch_generation=shifting)
    run_decode(worker, world, steps=3)  # write_context_kv checks every committed row's position
    assert world.context_writes


def test_decode_gives_the_drafter_the_committed_tokens_context(markov_worker):
    """Every verify row's context is written at its own slot (inside the verify graph when there is one); rows past
    the commit hold rejected drafts until the next block rewrites them, so the checks are what the drafter reads."""
    worker, world = markov_worker
    batch = run_decode(worker, world)[4]
    assert_context_holds_every_committed_token(world, batch)
    width = world.block * 3
    assert all(slots.numel() == width and bool((slots != 0).all()) for _, slots in world.context_writes)


def draft_graph_runner(block: int, capture_bs: list[int]):
    """SGLang's DecodeCudaGraphRunner as __init__ and capture() leave it for a DFLASH draft runner (TP1, no DP,
    TBO, PDMux or LoRA), without capturing anything: only the state can_run_graph reads."""
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_utils import resolve_num_tokens_per_req

    algorithm = SpeculativeAlgorithm.DFLASH
    runner = DecodeCudaGraphRunner.__new__(DecodeCudaGraphRunner)
    runner.model_runner = SimpleNamespace(spec_algorithm=algorithm, is_draft_worker=True, attn_backend=object())
    runner.captured_req_width = resolve_num_tokens_per_req(
        phase="target_verify", server_args=None, spec_algorithm=algorithm, is_draft_worker=True,
        num_draft_tokens=block,
    )
    runner.ragged_verify_mode = False  # __init__: never for a draft runner (`and not model_runner.is_draft_worker`)
    runner.capture_bs, runner.max_bs = capture_bs, max(capture_bs)
    runner.disable_padding = runner.require_mlp_tp_gather = runner.require_mlp_sync = False
    runner.enable_pdmux = runner.is_encoder_decoder = runner.enable_two_batch_overlap = False
    # capture_prepare: the capture mode is that of the spec_info the runner captures with.
    runner.capture_hidden_mode = runner.get_spec_info(block * runner.max_bs).capture_hidden_mode
    return runner


def test_the_drafter_forward_is_one_sglang_draft_graph_can_replay(markov_worker):
    """The ForwardBatch our draft step hands the draft runner passes SGLang's own replay predicate
    (ModelRunner._forward_raw: forward_mode.is_cuda_graph() and DecodeCudaGraphRunner.can_run_graph), with the
    block ids, which the replay copies into the graph's input buffer, and no embeddings: the drafter embeds them
    inside the graph. Else the drafter would run eagerly, its head outside the graph."""
    import inspect

    from dflash_sglang.sglang.draft_model import DFlashSGLangDrafter
    from dflash_sglang.sglang.worker import draft_block_spec

    worker, world = markov_worker
    worker.draft_block_spec = draft_block_spec(world.block, "cpu")
    seen = []
    plain = world.draft_forward
    worker.draft_runner = SimpleNamespace(forward=lambda fb: seen.append(fb) or plain(fb), token_to_kv_pool=None)
    run_decode(worker, world, steps=1)
    (fb,) = seen
    assert fb.forward_mode.is_cuda_graph() and fb.input_embeds is None
    assert fb.input_ids.shape[0] == fb.batch_size * world.block

    assert draft_graph_runner(world.block, [1, 2, 4, 8]).can_run_graph(fb)
    assert not draft_graph_runner(world.block, [1, 2]).can_run_graph(fb)  # 3 requests, graphs up to 2: eager
    assert not draft_graph_runner(world.block + 1, [1, 2, 4, 8]).can_run_graph(fb)  # another width: eager
    # SGLang captures a DFLASH draft graph with its input_embeds buffer only for a forward that takes them.
    assert "input_embeds" not in inspect.signature(DFlashSGLangDrafter.forward).parameters


def one_hot_sampling_info():
    """Sampling settings that make every verify row one-hot (top-k 1): the sampling path, greedy's outcome."""
    return SimpleNamespace(
        is_all_greedy=False, temperatures=torch.ones(3, 1), top_ks=torch.ones(3, dtype=torch.int32),
        top_ps=torch.ones(3), min_ps=torch.zeros(3), need_top_k_sampling=True, need_top_p_sampling=False,
        need_min_p_sampling=False, has_custom_logit_processor=False, acc_additive_penalties=None,
        acc_scaling_penalties=None, penalizer_orchestrator=None, vocab_mask=None, logit_bias=None,
    )


@pytest.mark.parametrize("rows_per_chunk", [128, 6])
def test_sampling_verification_with_greedy_rows_equals_greedy(markov_worker, monkeypatch, rows_per_chunk):
    from dflash_sglang.sglang import worker as worker_module

    monkeypatch.setattr(worker_module, "SAMPLING_ROWS_PER_CHUNK", rows_per_chunk)
    worker, world = markov_worker
    sampling = one_hot_sampling_info()
    _, _, greedy_emitted, _, _ = run_decode(worker, world)
    _, _, sampled_emitted, _, _ = run_decode(worker, world, sampling_info=sampling)
    assert sampled_emitted == greedy_emitted


def test_logit_bias_is_applied_to_every_verify_row(markov_worker):
    worker, world = markov_worker
    bias = torch.zeros(3, world.vocab)
    bias[:, 7] = 100.0  # every request now greedily emits 7 after its first token
    sampling = SimpleNamespace(
        is_all_greedy=True, has_custom_logit_processor=False, acc_additive_penalties=None,
        acc_scaling_penalties=None, penalizer_orchestrator=None, vocab_mask=None, logit_bias=bias,
        apply_logits_bias=lambda logits: logits.add_(bias),
    )
    _, first_tokens, emitted, _, _ = run_decode(worker, world, sampling_info=sampling, steps=3)
    for i, tokens in enumerate(emitted):
        assert tokens[0] == int(first_tokens[i]) and set(tokens[1:]) == {7}


@pytest.mark.parametrize("adaptive", [False, True])
def test_prefill_captures_features_and_writes_prompt_context(markov_worker, adaptive):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode

    from dflash_sglang.adaptive import WidthController

    worker, world = markov_worker
    if adaptive:  # the prefill tells the width controller that the decode steps around it are not steps alone
        worker.width_controller = WidthController((world.block, 1))
    # The fake drafter checks that each feature row arrives with its own position.
    features = torch.tensor([3, 4, 5, 6, 0, 1, 2]).float()[:, None].expand(-1, 2 * world.vocab)
    captured = {}

    def target_prefill(batch, capture_hidden_mode=None):
        captured["mode"] = capture_hidden_mode
        return SimpleNamespace(logits_output=SimpleNamespace(hidden_states=features),
                               next_token_ids=torch.tensor([9, 4]))

    worker._target_worker = SimpleNamespace(forward_batch_generation=target_prefill)
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, seq_lens=torch.tensor([7, 3]), prefix_lens=[3, 0],
                            extend_lens=[4, 3], out_cache_loc=torch.arange(100, 107))
    published = []
    result = worker.forward_batch_generation(batch, on_publish=published.append)
    assert captured["mode"] == CaptureHiddenMode.FULL
    positions, slots = world.context_writes[0]
    assert positions.tolist() == [3, 4, 5, 6, 0, 1, 2] and slots.tolist() == list(range(100, 107))
    assert result.logits_output.hidden_states is None
    assert result.next_draft_input.bonus_tokens.tolist() == [9, 4]
    assert torch.equal(published[0], batch.seq_lens) and torch.equal(result.new_seq_lens, batch.seq_lens)
    if adaptive:
        assert worker.width_controller._interrupted > 0


def prefill_batch(world, prefix_lens, extend_lens, pool_rows, **fields):
    """An EXTEND batch as SGLang's scheduler hands it over: each request's extend tokens and their slots (its
    req_to_token row past its cached prefix), concatenated."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    g = torch.Generator().manual_seed(sum(extend_lens))
    tokens = [torch.randint(0, world.vocab - 1, (n,), generator=g) for n in extend_lens]
    slots = [world.req_to_token[row, p:p + n] for row, p, n in zip(pool_rows, prefix_lens, extend_lens)]
    seq_lens = torch.tensor([p + n for p, n in zip(prefix_lens, extend_lens)])
    return SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, prefix_lens=list(prefix_lens), extend_lens=list(extend_lens),
        seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(), seq_lens_sum=int(seq_lens.sum()), orig_seq_lens=seq_lens,
        req_pool_indices=torch.tensor(pool_rows),
        input_ids=torch.cat(tokens), out_cache_loc=torch.cat(slots), spec_info=None, sampling_info=None,
        return_logprob=False, return_hidden_states=False, is_prefill_only=False, input_embeds=None,
        multimodal_inputs=[None] * len(extend_lens), **fields), tokens


@pytest.mark.parametrize("adaptive", [False, True])
def test_prefill_through_verify_rows_samples_the_last_token_and_writes_every_prompt_tokens_context(markov_worker,
                                                                                                    adaptive):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.adaptive import WidthController

    worker, world = markov_worker
    block = world.block
    worker.prefill_width, worker.prefill_max_rows = block, 8
    if adaptive:  # the rows run at the chain's width whatever the last decode step chose
        worker.width_controller = WidthController((block, 1))
        worker.active_width, applied = 1, []
        worker.verify_resources = {w: SimpleNamespace(apply=lambda runner, w=w: applied.append(w)) for w in (block, 1)}
    sampled, seen = [], []
    worker.model_runner.model_config = SimpleNamespace(context_len=512)
    worker.model_runner.sample = lambda out, fb: sampled.append(fb) or out.next_token_logits.argmax(-1)
    verify_forward = worker._target_worker.forward_batch_generation
    worker._target_worker = SimpleNamespace(
        forward_batch_generation=lambda *args, **kw: seen.append(kw) or verify_forward(*args, **kw))
    batch, tokens = prefill_batch(world, [3, 0, 0], [4, 13, 1], [2, 0, 1])
    published = []
    result = worker.forward_batch_generation(batch, on_publish=published.append)

    (call,) = seen
    forward = call["forward_batch"]
    assert forward.forward_mode == ForwardMode.TARGET_VERIFY and forward.batch_size == 5  # rows of 1 + 3 + 1
    assert forward.req_pool_indices.tolist() == [2, 0, 0, 0, 1]
    assert forward.seq_lens.tolist() == [3, 0, block, 2 * block, 0]
    rows = forward.input_ids.view(5, block)
    assert rows[0, :4].tolist() == tokens[0].tolist() and rows[4, 0] == tokens[2][0]
    assert rows[1:4].reshape(-1)[:13].tolist() == tokens[1].tolist()
    assert forward.positions.view(5, block)[2].tolist() == list(range(block, 2 * block))
    slots = forward.out_cache_loc.view(5, block)
    assert slots[0, 4:].tolist() == [0] * (block - 4) and slots[4, 1:].tolist() == [0] * (block - 1)  # pads
    # SGLang's sampler, on the EXTEND batch, drew each first token from the last prompt token's logits.
    last = [int(t[-1]) for t in tokens]
    assert result.next_token_ids.tolist() == [int(world.table[t]) for t in last]
    assert sampled[0].forward_mode == ForwardMode.EXTEND
    assert result.next_draft_input.bonus_tokens.tolist() == result.next_token_ids.tolist()
    assert torch.equal(published[0], batch.seq_lens) and torch.equal(result.new_seq_lens, batch.seq_lens)
    # The drafter's context holds every prompt token at its position and slot, written once (in the graph or after).
    for row, prefix, toks in zip([2, 0, 1], [3, 0, 0], tokens):
        for i, token in enumerate(toks.tolist()):
            assert world.draft_pool[int(world.req_to_token[row, prefix + i])] == (prefix + i, token)
    assert len(world.context_writes) == 1
    if adaptive:
        assert applied == [block] and worker.active_width == block


@pytest.mark.parametrize("change, reason", [
    (dict(return_logprob=True), "logprobs"),
    (dict(multimodal_inputs=[object(), None]), "multimodal"),
    (dict(input_embeds=torch.zeros(3)), "input embeddings"),
    (dict(extend_lens=[40, 3]), "verify rows, above the largest captured graph"),
    (dict(prefix_lens=[508, 0]), "past the context window"),  # 508 + one padded row of 6 > 512
    (dict(), None),
])
def test_prefills_that_need_sglangs_prefill_keep_it(markov_worker, caplog, change, reason):
    worker, world = markov_worker
    worker.prefill_width, worker.prefill_max_rows = world.block, 4
    worker.model_runner.model_config = SimpleNamespace(context_len=512)
    batch, _ = prefill_batch(world, [3, 0], [4, 3], [2, 0])
    for name, value in change.items():
        setattr(batch, name, value)
    with caplog.at_level(logging.DEBUG, logger="dflash_sglang.sglang.worker"):
        assert worker.takes_verify_prefill(batch) is (reason is None)
    assert reason is None or reason in caplog.text
    worker.prefill_width = None  # the server's choice comes first
    assert not worker.takes_verify_prefill(batch)


@pytest.mark.parametrize("setting, tree_budget, resources, server, graphs, width", [
    (None, None, (), {}, 8, 16), (None, 63, (16,), {}, 8, 16), (None, 63, (), {}, 8, None),
    (None, None, (), {}, 0, None), (None, None, (), dict(enable_lora=True), 8, None),
    (None, None, (), dict(sliding_window_size=512), 8, None), (None, None, (), dict(tp_size=2), 8, None),
    (True, None, (), dict(tp_size=2), 8, 16), (True, 63, (), {}, 8, None),
])
def test_verify_prefill_needs_causal_verify_graphs_and_a_plain_target(caplog, setting, tree_budget, resources, server,
                                                                      graphs, width):
    """Chain servers and adaptive tree servers (their chain steps' graphs) prefill as rows; a tree server without
    them, a server without graphs, LoRA or sliding windows keep SGLang's prefill and say why, with a warning when
    the flag asked for the path. By default a tensor-parallel server keeps SGLang's prefill; the flag overrides."""
    from dflash_sglang.sglang.tree_mode import TreeSettings
    from dflash_sglang.sglang.worker import DFlashWorker

    worker = DFlashWorker.__new__(DFlashWorker)
    worker.__dict__.update(
        verify_prefill_setting=setting, tree=tree_budget and TreeSettings(budget=tree_budget, topk=4), block_size=16,
        verify_resources={w: None for w in resources},
        server_args=SimpleNamespace(enable_lora=server.get("enable_lora", False), lora_paths=None,
                                    tp_size=server.get("tp_size", 1)),
        model_runner=SimpleNamespace(model_config=SimpleNamespace(is_multimodal=False, model_is_mrope=False),
                                     sliding_window_size=server.get("sliding_window_size")))
    with caplog.at_level(logging.INFO, logger="dflash_sglang.sglang.worker"):
        worker.enable_verify_prefill(graphs)
    assert worker.prefill_width == width
    assert ("prefills run as rows of 16 tokens" in caplog.text) is (width is not None)
    assert ("prefills run SGLang's prefill here" in caplog.text) is (width is None)
    if width is None:
        assert {r.levelno for r in caplog.records} == {logging.WARNING if setting else logging.INFO}


def test_idle_step_is_empty(markov_worker):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    worker, _ = markov_worker
    published = []
    result = worker.forward_batch_generation(SimpleNamespace(forward_mode=ForwardMode.IDLE), published.append)
    assert result.next_token_ids.numel() == 0 and result.accept_lens.numel() == 0
    assert result.next_draft_input.bonus_tokens.numel() == 0 and published[0].numel() == 0


# ------------------------------------------------------------------ tree mode


@pytest.fixture
def tree_worker(markov_worker):
    return in_tree_mode(*markov_worker)


def in_tree_mode(worker, world):
    from dflash_sglang.sglang.draft_head import TopkDraftHead
    from dflash_sglang.sglang.tree_mode import TreeSettings
    from dflash_sglang.sglang.worker import verify_graph_context

    tree = TreeSettings(budget=12, topk=2)
    # As DFlashWorker.__init__, with graphs up to the 3 requests run_decode serves.
    context = verify_graph_context(worker.draft_model, worker.draft_runner, world.block, tree, 3, "cpu")
    world.capture_tail_hooks[:] = [context.capture_hook]
    worker.__dict__.update(
        tree=tree,
        verify_context=context,
        verify_offsets=torch.arange(tree.verify_width),
        draft_head=TopkDraftHead(torch.eye(world.vocab), world.block, num_rows=world.vocab, topk=tree.topk),
    )
    return worker, world


def test_tree_steps_emit_the_targets_greedy_chain_and_accept_past_the_drafters_first_choice(
        markov_worker, tree_worker):
    worker, world = tree_worker
    original_slots = world.req_to_token.clone()
    prompt_lens, first_tokens, emitted, tree_commits, batch = run_decode(worker, world)
    for i, tokens in enumerate(emitted):
        assert tokens == [int(first_tokens[i])] + world.chain(int(first_tokens[i]), len(tokens) - 1)
    # Each request's slot row is only ever permuted: nothing lost, nothing duplicated.
    for row, original in zip(world.req_to_token, original_slots):
        assert sorted(row.tolist()) == sorted(original.tolist())

    chain_world = MarkovWorld()
    worker.__dict__.update(tree=None, draft_head=GreedyDraftHead(torch.eye(chain_world.vocab), chain_world.block,
                                                                 num_rows=chain_world.vocab))
    chain_commits = run_decode(worker, chain_world)[3]
    # The drafter's second choice is right wherever its first is wrong, and the budget reaches it: the tree
    # commits whole blocks where the chain stops at the first wrong guess.
    assert all(n == world.block for step in tree_commits for n in step)
    assert sum(map(sum, tree_commits)) > sum(map(sum, chain_commits))


def test_tree_steps_give_the_drafter_the_committed_paths_context(tree_worker):
    """Every node's context is written at its verify slot and depth position (inside the verify graph when there
    is one); the commit's slot permutation puts the accepted path's at the committed positions, which every
    drafter forward checks, and the rejected nodes' past them."""
    worker, world = tree_worker
    batch = run_decode(worker, world)[4]
    assert_context_holds_every_committed_token(world, batch)
    width = worker.tree.verify_width
    assert [slots.numel() for _, slots in world.context_writes] == [3 * width] * 8  # all nodes, once a step


@pytest.mark.parametrize("budget, staged", [(12, 3 * 13), (5, None)])
def test_tree_graphs_write_the_context_unless_the_chain_steps_share_them(budget, staged):
    """A tree of the block's width verifies through the graphs a chain step replays, whose positions are its
    lengths plus the row: there the tree's context is written after its forward, and nothing is staged."""
    from dflash_sglang.sglang.tree_mode import TreeSettings
    from dflash_sglang.sglang.worker import verify_graph_context

    context = verify_graph_context(None, None, 6, TreeSettings(budget=budget, topk=2), 3, "cpu")
    assert context.tree_width == (budget + 1 if staged else None)
    assert (context.tree_positions.numel() if staged else context.tree_positions) == staged
    assert context.widths == ({6, 1} if staged else {1})


def test_tree_sampling_with_greedy_rows_equals_greedy(tree_worker):
    worker, world = tree_worker
    sampling = one_hot_sampling_info()
    greedy = run_decode(worker, world)[2]
    world.req_to_token = torch.arange(4 * 512).view(4, 512) + 1
    worker.model_runner.req_to_token_pool.req_to_token = world.req_to_token
    assert run_decode(worker, world, sampling_info=sampling)[2] == greedy


def test_topk_draft_head_is_the_drafters_top_k_and_shards_agree():
    from dflash_sglang.sglang.draft_head import TopkDraftHead, drafter_logits

    torch.manual_seed(0)
    weight, hidden = torch.randn(40, 16), torch.randn(3 * 4, 16)
    head = TopkDraftHead(weight, 4, num_rows=40, topk=5, softcap=30.0)
    logprobs, ids = head(hidden)
    full = torch.log_softmax(drafter_logits(hidden.view(3, 4, 16)[:, 1:].reshape(-1, 16), weight, 1.0, 30.0), -1)
    expected_values, expected_ids = full.topk(5, dim=-1)
    assert torch.equal(ids, expected_ids) and torch.allclose(logprobs, expected_values, atol=1e-5)

    class TwoShards:  # all_gather over two "ranks" that hold rows 0..19 and 20..39
        world_size = 2

        def __init__(self):
            self.parts = []

        def all_gather_into_tensor(self, out, local):
            self.parts.append(local)

    group = TwoShards()
    shards = [TopkDraftHead(weight[:20], 4, num_rows=20, topk=5, softcap=30.0, tp_group=group),
              TopkDraftHead(weight[20:], 4, num_rows=20, vocab_start=20, topk=5, softcap=30.0, tp_group=group)]
    locals_ = []
    for shard in shards:  # what each rank computes before its all-gathers
        rows = shard._draft_rows(hidden)
        logits = drafter_logits(rows, shard.weight, 1.0, 30.0)
        values, local_ids = logits.topk(5, dim=-1)
        locals_.append((values, local_ids + shard.vocab_start, torch.logsumexp(logits, -1, keepdim=True)))
    gathered = [torch.cat([loc[k] for loc in locals_]) for k in range(3)]

    def fake_gather(values, ids, normalizer):
        def gather(out, local):
            out.copy_(next(sources))
        sources = iter(gathered)
        group.all_gather_into_tensor = gather
        return TopkDraftHead._gather_shards(shards[0], values, ids, normalizer)

    best, best_ids, norm = fake_gather(*locals_[0])
    assert torch.equal(best_ids, expected_ids) and torch.allclose(best - norm, expected_values, atol=1e-5)


def test_tree_flags_reach_the_scheduler_as_environment(monkeypatch):
    import argparse

    from dflash_sglang.sglang import flags, tree_mode

    for name in (tree_mode.BUDGET_ENV, tree_mode.TOPK_ENV):
        monkeypatch.setenv(name, "")  # recorded, so the hook's own writes are undone too (delenv of an unset one is not)
    parser = argparse.ArgumentParser()
    flags.add_cli_args_hook(lambda p: p.add_argument("--speculative-num-draft-tokens", type=int), parser)
    seen = {}
    args = parser.parse_args(["--speculative-dflash-tree-budget", "31", "--speculative-dflash-topk", "6"])
    flags.from_cli_args_hook(lambda cls, a: seen.setdefault("args", a), object, args)
    assert seen["args"].speculative_num_draft_tokens == 32
    assert tree_mode.settings_from_env() == tree_mode.TreeSettings(budget=31, topk=6)
    assert tree_mode.mask_policy_hook(lambda backend: ("TritonAttnBackend", False), None) == ("TritonAttnBackend", True)
    with pytest.raises(DFlashConfigError, match="needs --speculative-dflash-tree-budget"):
        flags.from_cli_args_hook(lambda cls, a: a, object, parser.parse_args(["--speculative-dflash-topk", "2"]))


def test_tree_mode_is_off_without_the_flag(monkeypatch):
    from dflash_sglang.sglang import tree_mode

    monkeypatch.delenv(tree_mode.BUDGET_ENV, raising=False)
    assert tree_mode.settings_from_env() is None
    assert tree_mode.mask_policy_hook(lambda backend: ("TritonAttnBackend", False), None) == ("TritonAttnBackend", False)
    with pytest.raises(DFlashConfigError, match="must be an integer"):
        tree_mode.settings_from_env({tree_mode.BUDGET_ENV: "lots"})


@pytest.mark.parametrize("budget,topk,width,backend,message", [
    (31, 4, 32, "triton", None),
    (31, 4, 16, "triton", "--speculative-num-draft-tokens is 16"),
    (31, 4, 32, "fa3", "--attention-backend triton"),
    (20, 1, 21, "triton", "distinct draft nodes"),
    (3, 4, 4, "triton", "too small for the drafter's block"),
    (0, 4, 1, "triton", "between 1 and 255"),
    (31, 0, 32, "triton", "between 1 and 64"),
])
def test_check_tree_names_the_flag_and_the_fix(budget, topk, width, backend, message):
    from dflash_sglang.sglang.tree_mode import TreeSettings, check_tree

    errors = check_tree(TreeSettings(budget, topk), 16, width, backend)
    if message is None:
        assert errors == []
    else:
        assert any(message in e for e in errors), errors


def test_req_to_token_rows_hold_dflashs_reservation(spec_algorithm, monkeypatch):
    """SGLang reserves committed + 2 x num_draft_tokens slots per DFLASH request; after load_plugins() the rows
    kv_cache_configurator sizes hold that for a request one token short of the context length."""
    from sglang.srt.mem_cache import kv_cache_configurator

    monkeypatch.delenv(plugin.DISABLE_ENV, raising=False)
    args = SimpleNamespace(speculative_algorithm="DFLASH", speculative_num_draft_tokens=16,
                           max_speculative_num_draft_tokens=16, page_size=1)
    context = 2048
    extra = kv_cache_configurator.get_req_to_token_extra_context_len(args)
    assert (context - 1) + 2 * 16 <= context + extra
    monkeypatch.setenv(plugin.DISABLE_ENV, "1")  # the builtin keeps SGLang's own sizing
    assert kv_cache_configurator.get_req_to_token_extra_context_len(args) == 4 + 16
    args.speculative_algorithm = "EAGLE"
    monkeypatch.delenv(plugin.DISABLE_ENV)
    assert kv_cache_configurator.get_req_to_token_extra_context_len(args) == 4 + 16


# ------------------------------------------------------------------ adaptive width


class ScriptedWidths:
    """A width controller that runs a fixed cycle of widths and records what it is told."""

    def __init__(self, widths):
        self.widths, self.step, self.observed = widths, 0, []

    def choose(self, batch_size):
        width = self.widths[self.step % len(self.widths)]
        self.step += 1
        return width

    def observe(self, committed, batch_size):
        self.observed.append((committed, batch_size))

    def summary(self):
        return f"{len(self.observed)} results"


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("plain_decode", [False, True], ids=["plain verify", "plain decode"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "one-hot sampling"])
def test_plain_steps_between_speculative_ones_keep_the_output_and_the_drafters_context(markov_worker, tree,
                                                                                      plain_decode, sampled, caplog):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.sglang.adaptive_width import VerifyResources

    worker, world = in_tree_mode(*markov_worker) if tree else markov_worker
    spec_width = worker.tree.verify_width if worker.tree else world.block
    worker.model_runner.attn_backend, worker.model_runner.decode_cuda_graph_runner = "spec backend", "spec graphs"
    worker.__dict__.update(
        width_controller=ScriptedWidths([spec_width, 1, 1, spec_width, 1, spec_width, spec_width, 1]),
        verify_resources={spec_width: VerifyResources.current(worker.model_runner, spec_width),
                          1: VerifyResources(1, "plain backend", "plain graphs", decode=plain_decode)},
        active_width=spec_width,
    )
    backends, strides = [], []
    target = worker._target_worker.forward_batch_generation

    def verify(batch=None, forward_batch=None, is_verify=False):
        backends.append((worker.model_runner.attn_backend, worker.model_runner.decode_cuda_graph_runner))
        strides.append(forward_batch.input_ids.numel() // 3)
        # A plain step's forward is SGLang's decoding one (DECODE, no spec_info, lengths counting the anchor) or
        # a one-token verify; speculative steps always verify.
        decoding = strides[-1] == 1 and plain_decode
        assert forward_batch.forward_mode == (ForwardMode.DECODE if decoding else ForwardMode.TARGET_VERIFY)
        assert (forward_batch.spec_info is None) is decoding
        if decoding:  # the anchor's KV goes to the slot of its position, the committed length
            slots = world.req_to_token[forward_batch.req_pool_indices, forward_batch.positions]
            assert torch.equal(forward_batch.out_cache_loc, slots)
        return target(batch, forward_batch, is_verify)

    worker._target_worker = SimpleNamespace(forward_batch_generation=verify)
    # One-hot sampling rows take every width's sampling acceptance to greedy's outcome.
    prompt_lens, first_tokens, emitted, commits, batch = run_decode(
        worker, world, sampling_info=one_hot_sampling_info() if sampled else None, steps=16)

    for i, tokens in enumerate(emitted):
        assert tokens == [int(first_tokens[i])] + world.chain(int(first_tokens[i]), len(tokens) - 1)
    assert_context_holds_every_committed_token(world, batch)
    plain = [i for i, width in enumerate(strides) if width == 1]
    assert plain == [i for i in range(16) if worker.width_controller.widths[i % 8] == 1]
    assert all(commits[i] == [1, 1, 1] for i in plain)
    assert all(backends[i] == ("plain backend", "plain graphs") for i in plain)
    assert all(backends[i] == ("spec backend", "spec graphs") for i in range(16) if i not in plain)
    assert max(n for step in commits for n in step) > 1

    with caplog.at_level(logging.INFO, logger="dflash_sglang.sglang.worker"):
        worker.on_verify_complete_cpu([0, 2, 5], batch_size=3)
        worker.on_verify_complete_cpu([1, 1, 1], batch_size=3)  # within the summary interval: not logged again
    assert worker.width_controller.observed == [([1, 3, 6], 3), ([2, 2, 2], 3)]
    logged = [r.getMessage() for r in caplog.records if r.name == "dflash_sglang.sglang.worker"]
    assert logged == ["dflash_sglang: adaptive width, per batch size:\n1 results"]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "one-hot sampling"])
def test_a_tree_server_steps_tree_chain_and_plain_widths_in_any_order(markov_worker, sampled):
    """The adaptive width's three candidates in tree mode: every step's verify has its width's stride and
    resources, a chain step verifies the top-1 of the tree's top-k, and the output and the drafter's context stay
    exact whatever the order, through greedy acceptance and through each width's sampling acceptance (one-hot
    rows: greedy's outcome)."""
    from dflash_sglang.sglang.adaptive_width import VerifyResources

    worker, world = in_tree_mode(*markov_worker)
    tree_width, chain = worker.tree.verify_width, world.block
    cycle = [tree_width, chain, 1, chain, tree_width, 1, chain, chain]
    worker.__dict__.update(
        width_controller=ScriptedWidths(cycle),
        verify_resources={w: VerifyResources(w, f"backend {w}", f"graphs {w}", decode=w == 1) for w in set(cycle)},
        active_width=tree_width,
    )
    worker.verify_resources[tree_width].apply(worker.model_runner)
    seen = []
    target = worker._target_worker.forward_batch_generation

    def verify(batch=None, forward_batch=None, is_verify=False):
        stride = forward_batch.input_ids.numel() // 3
        seen.append((stride, worker.model_runner.attn_backend, forward_batch.input_ids.view(3, stride).clone()))
        return target(batch, forward_batch, is_verify)

    worker._target_worker = SimpleNamespace(forward_batch_generation=verify)
    worker.draft_head = RecordingHead(worker.draft_head)
    prompt_lens, first_tokens, emitted, commits, batch = run_decode(
        worker, world, sampling_info=one_hot_sampling_info() if sampled else None, steps=16)

    for i, tokens in enumerate(emitted):
        assert tokens == [int(first_tokens[i])] + world.chain(int(first_tokens[i]), len(tokens) - 1)
    assert_context_holds_every_committed_token(world, batch)
    widths = [cycle[i % 8] for i in range(16)]
    assert [stride for stride, _, _ in seen] == widths
    assert all(backend == f"backend {stride}" for stride, backend, _ in seen)
    # Every step but a plain one drafts once; a chain step verifies each position's first (best) candidate.
    drafts = dict(zip([i for i, w in enumerate(widths) if w != 1], worker.draft_head.outputs))
    chain_steps = [i for i, w in enumerate(widths) if w == chain]
    for i in chain_steps:
        assert torch.equal(seen[i][2][:, 1:], drafts[i][1][:, 0].view(3, -1))
    assert max(n for i in chain_steps for n in commits[i]) > 1


class RecordingHead:
    """A draft head that keeps every output (eager drafter forwards only: it has no graph output)."""

    graph_tokens = None

    def __init__(self, head):
        self.head, self.outputs = head, []

    def __call__(self, hidden_states):
        self.outputs.append(self.head(hidden_states))
        return self.outputs[-1]


@pytest.mark.parametrize("splitkv", [False, True])
@pytest.mark.parametrize("tree_budget,widths,built,logged", [
    (None, (6, 1), [("plain", 1)], "6: a chain step; 1: a plain decoding step"),
    (12, (13, 6, 1), [("verify", 6), ("plain", 1)], "13: the tree; 6: a chain step; 1: a plain decoding step"),
    (12, (13, 1), [("plain", 1)], "13: the tree; 1: a plain decoding step"),  # the chain pinned out
    (5, (6, 1), [("plain", 1)], "6: the tree; 1: a plain decoding step"),  # a tree as wide as the block
])
def test_init_cuda_graphs_builds_resources_for_each_adaptive_width(monkeypatch, caplog, tree_budget, widths, built,
                                                                   logged, splitkv):
    from dflash_sglang.adaptive import WidthController
    from dflash_sglang.sglang import worker as worker_module
    from dflash_sglang.sglang.adaptive_width import VerifyResources
    from dflash_sglang.sglang.tree_mode import TreeSettings
    from dflash_sglang.sglang.worker import DFlashWorker

    calls = []
    monkeypatch.setattr(worker_module, "get_server_args", lambda: "published args")
    monkeypatch.setattr(worker_module, "build_verify_resources",
                        lambda runner, width, args, split: calls.append(("verify", width, args, split)) or
                        VerifyResources(width, f"backend {width}", None))
    monkeypatch.setattr(worker_module, "build_plain_resources",
                        lambda runner, args, split: calls.append(("plain", 1, args, split)) or
                        VerifyResources(1, "plain", None))
    worker = DFlashWorker.__new__(DFlashWorker)
    model_runner = SimpleNamespace(attn_backend="spec backend", decode_cuda_graph_runner="spec graphs",
                                   server_args="runner args")
    worker.__dict__.update(
        server_args=SimpleNamespace(cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(bs=[]))),
        _draft_worker=SimpleNamespace(init_cuda_graphs=lambda: calls.append(("drafter graphs",))),
        model_runner=model_runner, block_size=6,
        tree=tree_budget and TreeSettings(budget=tree_budget, topk=2),
        width_controller=WidthController(widths), splitkv=splitkv,
        verify_prefill_setting=False,  # test_verify_prefill_needs_causal_verify_graphs_and_a_plain_target's part
    )
    with caplog.at_level(logging.INFO, logger="dflash_sglang.sglang.worker"):
        worker.init_cuda_graphs()
    assert f"tokens per request ({logged}), whichever" in caplog.text
    assert calls[0] == ("drafter graphs",)
    # The split-KV verify reaches every causal width's backend (a chain step's, a one-token verify's).
    assert calls[1:] == [(kind, width, ("runner args", "published args"), splitkv) for kind, width in built]
    assert sorted(worker.verify_resources) == sorted(widths)
    assert worker.verify_resources[widths[0]].attn_backend == "spec backend"


def test_adaptive_width_is_refused_across_ranks():
    from dflash_sglang.sglang.adaptive_width import check_adaptive

    assert check_adaptive(SimpleNamespace(tp_size=1, pp_size=1, dp_size=1)) == []
    errors = check_adaptive(SimpleNamespace(tp_size=2, pp_size=1, dp_size=1))
    assert len(errors) == 1 and "--tp-size is 2" in errors[0] and "drop the flag" in errors[0]


def test_plain_verify_graphs_are_captured_causal_in_tree_mode(monkeypatch):
    from dflash_sglang.sglang import tree_mode

    monkeypatch.setenv(tree_mode.BUDGET_ENV, "31")
    policy = lambda backend: ("TritonAttnBackend", False)  # noqa: E731
    assert tree_mode.mask_policy_hook(policy, None) == ("TritonAttnBackend", True)
    with tree_mode.causal_verify_capture():
        assert tree_mode.mask_policy_hook(policy, None) == ("TritonAttnBackend", False)
    assert tree_mode.mask_policy_hook(policy, None) == ("TritonAttnBackend", True)


def test_verify_resources_are_built_at_width_one_and_the_arguments_restored(monkeypatch):
    """build_verify_resources against SGLang's real DecodeCudaGraphRunner signature, with its construction
    recorded instead of run (capture needs a GPU): the backend and the runner see width 1, everything after sees
    the speculative width again."""
    from sglang.srt.model_executor import runner as runner_module

    from dflash_sglang.sglang.adaptive_width import build_verify_resources

    class Args:
        def __init__(self):
            self.speculative_num_draft_tokens = 16

        def override(self, source, **fields):
            self.__dict__.update(fields)

    args, published = Args(), Args()
    seen = {}

    class Runner:
        def __init__(self, model_runner, *, attn_backend=None, speculative_num_steps=None,
                     speculative_num_draft_tokens=None):
            seen["runner"] = (attn_backend, speculative_num_draft_tokens, args.speculative_num_draft_tokens)

    monkeypatch.setattr(runner_module, "DecodeCudaGraphRunner", Runner)

    def new_backend(init_new_workspace=False):
        model_runner.init_new_workspace = init_new_workspace
        return ("backend", args.speculative_num_draft_tokens, published.speculative_num_draft_tokens)

    model_runner = SimpleNamespace(server_args=args, decode_cuda_graph_runner="spec graphs", init_new_workspace=False,
                                   _get_attention_backend=new_backend)
    resources = build_verify_resources(model_runner, 1, (args, published, args))
    assert resources.attn_backend == ("backend", 1, 1)
    assert seen["runner"] == (resources.attn_backend, 1, 1)
    assert args.speculative_num_draft_tokens == published.speculative_num_draft_tokens == 16
    assert model_runner.init_new_workspace is False
    model_runner.decode_cuda_graph_runner = None  # graphs off: the plain verify runs eagerly
    assert build_verify_resources(model_runner, 1, (args,)).graph_runner is None


@pytest.mark.parametrize("capture_fails,window", [(False, None), (True, None), (False, 4095)])
def test_plain_decode_resources_are_built_as_plain_decoding_and_everything_restored(monkeypatch, caplog,
                                                                                     capture_fails, window):
    """build_plain_resources against SGLang's real DecodeCudaGraphRunner signature, its construction recorded: the
    DECODE graphs are built while the runner's algorithm reads NONE (SGLang captures a speculative runner's decode
    graphs as TARGET_VERIFY) and the arguments say width 1 with hidden states returned, which makes SGLang capture
    them with full hidden states; all of it reads as before afterwards. If that capture fails, plain steps verify
    one token instead, with a warning; on a target with sliding-window layers they verify one token from the
    start (SGLang's triton decode reads one key fewer than the window)."""
    from sglang.srt.model_executor import runner as runner_module
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from dflash_sglang.sglang.adaptive_width import build_plain_resources

    class Args:
        def __init__(self):
            self.speculative_num_draft_tokens, self.enable_return_hidden_states = 16, False

        def override(self, source, **fields):
            self.__dict__.update(fields)

    args, published = Args(), Args()
    seen = []

    class Runner:
        def __init__(self, model_runner, *, attn_backend=None, speculative_num_steps=None,
                     speculative_num_draft_tokens=None):
            seen.append((model_runner.spec_algorithm, speculative_num_draft_tokens, args.speculative_num_draft_tokens,
                         args.enable_return_hidden_states, published.enable_return_hidden_states))
            if capture_fails and model_runner.spec_algorithm.is_none():
                raise RuntimeError("Capture cuda graph failed")

    monkeypatch.setattr(runner_module, "DecodeCudaGraphRunner", Runner)
    model_runner = SimpleNamespace(server_args=args, decode_cuda_graph_runner="spec graphs", init_new_workspace=False,
                                   spec_algorithm=SpeculativeAlgorithm.DFLASH, sliding_window_size=window,
                                   _get_attention_backend=lambda init_new_workspace=False: "backend")
    with caplog.at_level(logging.INFO, logger="dflash_sglang.sglang.adaptive_width"):
        resources = build_plain_resources(model_runner, (args, published))
    decode_build = (SpeculativeAlgorithm.NONE, 1, 1, True, True)
    verify_build = (SpeculativeAlgorithm.DFLASH, 1, 1, False, False)
    assert seen == ([verify_build] if window else [decode_build, verify_build] if capture_fails else [decode_build])
    assert resources.width == 1 and resources.decode is not (capture_fails or window is not None)
    assert ("plain steps verify one token (TARGET_VERIFY), whose attention reads the window" in caplog.text) is (
        window is not None)
    assert model_runner.spec_algorithm is SpeculativeAlgorithm.DFLASH
    assert (args.speculative_num_draft_tokens, args.enable_return_hidden_states) == (16, False)
    assert (published.speculative_num_draft_tokens, published.enable_return_hidden_states) == (16, False)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "dflash_sglang.sglang.adaptive_width"]
    assert ["cannot run as DECODE forwards" in message for message in warnings] == [True] * capture_fails


@pytest.mark.parametrize("raw,expected", [
    ("", (32, 1)), ("1", (1,)), ("32", (32,)), ("1,32", (32, 1)), ("32, 1", (32, 1)),
    ("16", None), ("1,1", None), ("plain", None), (",", None),
])
def test_adaptive_widths_can_be_pinned_and_a_bad_list_names_the_variable(raw, expected):
    from dflash_sglang.sglang.adaptive_width import WIDTHS_ENV, widths_from_env

    if expected is not None:
        assert widths_from_env(32, environ={WIDTHS_ENV: raw}) == expected
    else:
        with pytest.raises(DFlashConfigError, match=f"{WIDTHS_ENV}=.* among 32 .* and 1"):
            widths_from_env(32, environ={WIDTHS_ENV: raw})


@pytest.mark.parametrize("budget,raw,expected", [
    (64, "", (65, 16, 1)), (64, "16,1", (16, 1)), (64, "1, 65", (65, 1)), (64, "16", (16,)),
    (15, "", (16, 1)),  # the tree verifies a block's worth: the chain is no other width
    (64, "32", None), (64, "16,16", None), (15, "2", None),
])
def test_a_tree_server_adds_the_chain_to_its_adaptive_widths(budget, raw, expected):
    from dflash_sglang.sglang.adaptive_width import WIDTHS_ENV, widths_from_env

    if expected is not None:
        assert widths_from_env(budget + 1, 16, environ={WIDTHS_ENV: raw}) == expected
        return
    with pytest.raises(DFlashConfigError, match=f"{WIDTHS_ENV}=.* among {budget + 1} .*tree verify") as error:
        widths_from_env(budget + 1, 16, environ={WIDTHS_ENV: raw})
    # The message names every candidate of this server, the chain only where it is one.
    assert ("16 (a chain step of the drafter's block)" in str(error.value)) is (budget == 64)


def test_a_bad_adaptive_width_list_stops_the_worker_before_building_anything(tiny_dirs, monkeypatch):
    from dflash_sglang.sglang import worker as worker_module
    from dflash_sglang.sglang.adaptive_width import ADAPTIVE_ENV, WIDTHS_ENV

    def built(*args, **kwargs):
        raise AssertionError("the draft worker was built for a refused width list")

    monkeypatch.setattr(worker_module, "build_draft_worker", built)
    monkeypatch.setattr(worker_module, "use_as_dflash_draft_model", built)
    from dflash_sglang.sglang.tree_mode import BUDGET_ENV

    monkeypatch.setenv(BUDGET_ENV, "")  # a chain server, whatever ran before
    monkeypatch.setenv(ADAPTIVE_ENV, "1")
    monkeypatch.setenv(WIDTHS_ENV, "8")
    target, drafter = tiny_dirs["qwen3"]
    target_worker = SimpleNamespace(model_runner=fake_target_runner(target), device="cpu")
    args = startup_args(target, drafter)
    args.tp_size = args.pp_size = args.dp_size = 1
    with pytest.raises(DFlashConfigError, match=f"{WIDTHS_ENV}='8'"):
        worker_module.DFlashWorker(args, gpu_id=0, ps=None, nccl_port=0, target_worker=target_worker)


def test_split_kv_verify_needs_the_triton_backend():
    from dflash_sglang.sglang.verify_attention import FLAG, check_splitkv

    assert check_splitkv(SimpleNamespace(attention_backend="triton", decode_attention_backend=None)) == []
    assert check_splitkv(SimpleNamespace(attention_backend="triton", decode_attention_backend="triton")) == []
    errors = check_splitkv(SimpleNamespace(attention_backend="fa3", decode_attention_backend="flashinfer"))
    assert len(errors) == 2 and all(FLAG in e and "triton" in e for e in errors)
    assert "--attention-backend is fa3" in errors[0] and "--decode-attention-backend is flashinfer" in errors[1]


def test_split_kv_verify_switches_sglangs_triton_backend_and_refuses_others():
    """use_splitkv_verify on SGLang's real TritonAttnBackend class (an instance without its GPU-only __init__): its
    forward_extend becomes ours, wrapping the class's own (once, however often it is called); the private method
    ours stores the block's K/V through is still there; any other backend is refused by name."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    from dflash_sglang.sglang.verify_attention import FLAG, SplitKVVerifyExtend, use_splitkv_verify

    source = inspect.getsource(TritonAttnBackend.forward_extend)
    assert "self._set_kv_buffer(forward_batch, layer, loc_info, k, v)" in source  # the unscaled store ours mirrors
    backend = TritonAttnBackend.__new__(TritonAttnBackend)
    use_splitkv_verify(backend)
    use_splitkv_verify(backend)
    assert isinstance(backend.forward_extend, SplitKVVerifyExtend)
    assert backend.forward_extend.extend.__func__ is TritonAttnBackend.forward_extend
    with pytest.raises(DFlashConfigError, match=re.escape(FLAG)) as refused:
        use_splitkv_verify(SimpleNamespace(forward_extend=None))
    assert "SimpleNamespace" in str(refused.value)


@pytest.mark.parametrize("splitkv", [False, True])
def test_new_verify_backends_take_the_split_kv_kernel_before_their_graphs_are_captured(monkeypatch, splitkv):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.model_executor import runner as runner_module

    from dflash_sglang.sglang.adaptive_width import new_backend_and_graphs
    from dflash_sglang.sglang.verify_attention import SplitKVVerifyExtend

    seen = {}

    class Runner:
        def __init__(self, model_runner, *, attn_backend=None, speculative_num_draft_tokens=None):
            seen["at capture"] = isinstance(attn_backend.forward_extend, SplitKVVerifyExtend)

    def new_backend(init_new_workspace=False):
        return TritonAttnBackend.__new__(TritonAttnBackend)

    monkeypatch.setattr(runner_module, "DecodeCudaGraphRunner", Runner)
    model_runner = SimpleNamespace(decode_cuda_graph_runner="graphs", _get_attention_backend=new_backend)
    backend, _ = new_backend_and_graphs(model_runner, 16, splitkv)
    assert isinstance(backend.forward_extend, SplitKVVerifyExtend) is splitkv and seen["at capture"] is splitkv


@pytest.mark.parametrize("setting", [None, False, True])
@pytest.mark.parametrize("target_backend, draft_backend", [("triton", "triton"), ("triton", "fa4"), ("fa3", "fa3")])
def test_the_worker_switches_the_verify_to_split_kv_once_sglang_has_built_the_backends(monkeypatch, target_backend,
                                                                                     draft_backend, setting):
    """SGLang builds the runners' attention backends after every worker's constructor (Scheduler.init_model_worker,
    then init_all_attention_backends: the target's, then ours) and captures graphs after that, so the switch happens
    in our init_attention_backends: the target's backend, and the drafter's when it is a triton one. (On
    2026-11-30 the constructor did it and the server died: the runner had no attn_backend yet.) Unset, it switches
    wherever the target's backend is triton; asked for on another backend, use_splitkv_verify refuses it."""
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    from dflash_sglang.sglang import verify_attention
    from dflash_sglang.sglang import worker as worker_module
    from dflash_sglang.sglang.worker import DFlashWorker

    switched = []
    target_runner, drafter_runner = SimpleNamespace(), SimpleNamespace()

    def sglang_builds_backends(worker):  # the target's exists already; the base class builds the drafter's
        target_runner.attn_backend = f"{target_backend} target backend"
        drafter_runner.attn_backend = f"{draft_backend} draft backend"

    monkeypatch.setattr(BaseSpecWorker, "init_attention_backends", sglang_builds_backends)
    monkeypatch.setattr(worker_module, "use_splitkv_verify", switched.append)
    monkeypatch.setattr(verify_attention, "is_triton_backend", lambda backend: backend.startswith("triton"))
    monkeypatch.setattr(worker_module, "is_triton_backend", verify_attention.is_triton_backend)
    worker = DFlashWorker.__new__(DFlashWorker)
    worker.__dict__.update(model_runner=target_runner, draft_runner=drafter_runner, splitkv_setting=setting)
    worker.init_attention_backends()
    on = target_backend == "triton" if setting is None else setting
    want = [f"{target_backend} target backend"] + (["triton draft backend"] if draft_backend == "triton" else [])
    assert worker.splitkv is on and switched == (want if on else [])


@pytest.mark.parametrize("tree_budget", [None, 15])
def test_the_worker_constructor_reads_no_attention_backend(tiny_dirs, monkeypatch, tree_budget):
    """With the split-KV verify on, a chain or tree worker's constructor runs to its end (here, the fake drafter's
    missing embedding hook) on runners that have no attention backend yet, as SGLang's have then."""
    from dflash_sglang.sglang import worker as worker_module
    from dflash_sglang.sglang.adaptive_width import ADAPTIVE_ENV
    from dflash_sglang.sglang.tree_mode import BUDGET_ENV, TOPK_ENV
    from dflash_sglang.sglang.verify_attention import SPLITKV_ENV

    drafter_runner = SimpleNamespace(model=SimpleNamespace())
    monkeypatch.setattr(worker_module, "use_as_dflash_draft_model", lambda: None)
    monkeypatch.setattr(worker_module, "build_draft_worker",
                        lambda *args: SimpleNamespace(model_runner=drafter_runner))
    monkeypatch.setenv(BUDGET_ENV, str(tree_budget or ""))
    monkeypatch.setenv(TOPK_ENV, "4")
    monkeypatch.setenv(ADAPTIVE_ENV, "")
    monkeypatch.setenv(SPLITKV_ENV, "1")
    target, drafter = tiny_dirs["qwen3"]
    runner = fake_target_runner(target)
    assert not hasattr(runner, "attn_backend")
    args = startup_args(target, drafter)
    args.attention_backend, args.decode_attention_backend = "triton", None
    with pytest.raises(AttributeError, match="use_target_embedding"):
        worker_module.DFlashWorker(args, gpu_id=0, ps=None, nccl_port=0,
                                   target_worker=SimpleNamespace(model_runner=runner, device="cpu"))


def split_kv_verify_call(block, lengths, mask=None, mask_indptr=None, attn_type=None, mode="TARGET_VERIFY",
                         layer_changes=None, backend_changes=None, call_changes=None, pool_dtype=None,
                         dtype=torch.float32, device="cpu", layout=(6, 2, 16)):
    """One call of a triton backend's forward_extend after use_splitkv_verify, as SGLang's RadixAttention makes it:
    q a view of the fused qkv projection, k and v views of it shaped per head (not contiguous). The backend is the
    real class without its GPU-only __init__, its pool stores what set_kv_buffer is given, its own forward_extend a
    recorder. Returns what the call returned, the expected inputs, the store calls and the recorder's calls."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from dflash_sglang.sglang.verify_attention import use_splitkv_verify
    from tests.test_split_attention import attention_inputs, fused_views

    heads, kv_heads, dim = layout
    q3, k3, v3, pool_k, pool_v, indptr, indices = attention_inputs(heads, kv_heads, dim, block, lengths, seed=3,
                                                                   dtype=dtype, device=device)
    pool_dtype = pool_dtype or dtype
    tokens = q3.shape[0]
    q, k, v = fused_views(q3, k3, v3)
    q = q.view(tokens, -1)  # RadixAttention shapes k and v per head, and leaves q flat
    assert not k.is_contiguous() and not v.is_contiguous()
    layer = RadixAttention(heads, dim, dim ** -0.5, kv_heads, layer_id=0,
                           attn_type=attn_type if attn_type is not None else AttentionType.DECODER)
    for name, value in (layer_changes or {}).items():
        setattr(layer, name, value)
    stored, extended = [], []
    backend = TritonAttnBackend.__new__(TritonAttnBackend)
    backend.token_to_kv_pool = SimpleNamespace(
        get_key_buffer=lambda layer_id: pool_k.to(pool_dtype), get_value_buffer=lambda layer_id: pool_v.to(pool_dtype),
        set_kv_buffer=lambda layer_, loc, k_, v_: stored.append((loc, k_.clone(), v_.clone())))
    backend.dcp_size, backend.enable_deterministic, backend.allow_bidirectional_attention_in_extend = 1, False, True
    backend.forward_metadata = SimpleNamespace(
        qo_indptr=torch.arange(len(lengths) + 1, dtype=torch.int32, device=device) * block, kv_indptr=indptr,
        kv_indices=indices,
        custom_mask=mask, mask_indptr=mask_indptr, max_extend_len=block, swa_out_cache_loc=None,
        out_cache_loc_full_physical=None)
    for name, value in (backend_changes or {}).items():
        setattr(backend, name, value)
    backend.forward_extend = lambda *args, **kwargs: extended.append((args, kwargs)) or "the backend's own"
    use_splitkv_verify(backend)
    forward_batch = SimpleNamespace(forward_mode=getattr(ForwardMode, mode),
                                    out_cache_loc=torch.arange(tokens, device=device) + 1000)
    out = backend.forward_extend(q, k, v, layer, forward_batch, **(call_changes or {}))
    return out, (q3, k3, v3, pool_k, pool_v, indptr, indices), stored, extended


def test_split_kv_verify_serves_chains_trees_and_the_drafters_block_and_passes_on_the_rest():
    """A TARGET_VERIFY call is served by our kernel (here its reference, on the CPU) on the strided block K/V the
    model left, with no copy of them: the chain causally, a tree under its custom mask in SGLang's layout, the
    drafter's bidirectional block whole; the block's K/V are stored first, at out_cache_loc, as the backend does.
    What the kernel does not model reaches the backend's own forward_extend untouched."""
    from sglang.srt.layers.radix_attention import AttentionType

    from dflash_sglang.kernels.split_attention import verify_attention_reference
    from tests.test_split_attention import tree_mask

    block, lengths = 4, [5, 0, 9]
    _, mask, mask_indptr = tree_mask(lengths, block, seed=4)
    served = [
        (dict(), None, True),
        (dict(mask=mask, mask_indptr=mask_indptr), mask, True),
        (dict(attn_type=AttentionType.DECODER_BIDIRECTIONAL), None, False),
    ]
    for changes, want_mask, causal in served:
        out, inputs, stored, extended = split_kv_verify_call(block, lengths, **changes)
        q3, k3, v3 = inputs[:3]
        assert not extended and out.shape == (q3.shape[0], q3.shape[1] * q3.shape[2])
        want = verify_attention_reference(*inputs, block, 16 ** -0.5, torch.empty_like(q3), want_mask,
                                          changes.get("mask_indptr"), causal)
        assert torch.equal(out.view_as(q3), want), changes
        [(loc, k_stored, v_stored)] = stored
        assert torch.equal(loc.loc, torch.arange(q3.shape[0]) + 1000)
        assert torch.equal(k_stored, k3) and torch.equal(v_stored, v3)
    out, *_, stored, extended = split_kv_verify_call(block, lengths, call_changes=dict(save_kv_cache=False))
    assert not stored and not extended and out.shape[0] == block * len(lengths)

    passed_on = [
        dict(mode="EXTEND"), dict(mode="DECODE"), dict(call_changes=dict(sinks=torch.zeros(6))),
        dict(call_changes=dict(score_mod=object())), dict(layer_changes=dict(k_scale=torch.tensor(0.5))),
        dict(layer_changes=dict(sliding_window_size=8)), dict(layer_changes=dict(logit_cap=30.0)),
        dict(layer_changes=dict(xai_temperature_len=4)), dict(layer_changes=dict(v_head_dim=8)),
        dict(backend_changes=dict(dcp_size=2)),
        dict(backend_changes=dict(enable_deterministic=True)), dict(pool_dtype=torch.float16),
        dict(mask=mask), dict(mask=mask, mask_indptr=mask_indptr, attn_type=AttentionType.DECODER_BIDIRECTIONAL),
    ]
    for changes in passed_on:
        out, *_, stored, extended = split_kv_verify_call(block, lengths, **changes)
        assert out == "the backend's own" and not stored and len(extended) == 1, changes
    # A block of another length than the metadata's (a ragged extend) is passed on too.
    out, *_, stored, extended = split_kv_verify_call(3, [2, 2], backend_changes=dict(
        forward_metadata=SimpleNamespace(qo_indptr=torch.tensor([0, 3, 6]), max_extend_len=4, custom_mask=None,
                                         mask_indptr=None)))
    assert out == "the backend's own" and not stored


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["chain", "tree", "full"])
def test_split_kv_verify_matches_sglangs_extend_kernel_on_the_gpu(mode, dtype, monkeypatch):
    """The takeover against what it replaces: SGLang's own verify attention (`extend_attention_fwd`, the triton
    backend's TARGET_VERIFY kernel, on contiguous copies of the block K/V as the backend makes them) on the same
    fresh random inputs, at Qwen3-32B's head layout: a chain, a tree's custom mask and the drafter's full block.
    In float32 SGLang's kernel is compiled with IEEE dots, as e2e.sh serves float32: Triton's default rounds them
    as TF32, 3e-3 off on the H200 (2026-11-30), which would compare TF32 against float32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from sglang.srt.layers.radix_attention import AttentionType

    from tests.test_split_attention import tree_mask

    block, lengths, layout = 16, [37, 1024, 300, 0], (64, 8, 128)
    mask = mask_indptr = None
    if mode == "tree":
        _, mask, mask_indptr = tree_mask(lengths, block, seed=11)
        mask, mask_indptr = mask.cuda(), mask_indptr.cuda()
    attn_type = AttentionType.DECODER_BIDIRECTIONAL if mode == "full" else None
    out, inputs, stored, extended = split_kv_verify_call(block, lengths, mask=mask, mask_indptr=mask_indptr,
                                                         attn_type=attn_type, dtype=dtype, device="cuda",
                                                         layout=layout)
    assert not extended and len(stored) == 1
    q3, k3, v3, pool_k, pool_v, indptr, indices = inputs
    want = torch.empty_like(q3)
    qo_indptr = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda") * block
    extend_attention_fwd(q3, k3.contiguous(), v3.contiguous(), want, pool_k, pool_v, qo_indptr, indptr,
                         indices.to(torch.int64), mask, mode != "full", mask_indptr, block, 1.0, 1.0,
                         layout[2] ** -0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.view_as(q3).float(), want.float(), atol=tol), (out.view_as(q3) - want).abs().max()

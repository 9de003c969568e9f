"""The DFlash drafter as an SGLang model (RadixAttention, tensor-parallel linears, SGLang norms and RoPE).

It is the reference drafter (`dflash_sglang.drafter`) rebuilt on SGLang layers so the draft runner can page its
KV, batch it and capture it in CUDA graphs. SGLang runs it as a TARGET_VERIFY forward over one block per
request; its queries are the block rows, its keys the committed context K/V in the draft pool plus the block.
Full layers see the whole block (ENCODER_ONLY, i.e. non-causal), sliding layers are causal and windowed unless
the config says otherwise. Context K/V are written by `write_context_kv`, outside the forward: target features
-> fc -> hidden_norm -> each layer's k/v projection -> k_norm -> RoPE -> draft KV pool, with one GEMM for all
layers and one kernel for the norm, RoPE and the stores into SGLang's plain KV pool
(`dflash_sglang.kernels.context_kv_to_pool`); other pools get the kernel's layer-major output
(`context_kv_norm_rope`) through their own per-layer `set_kv_buffer`.

SGLang picks a model class by `architectures[0]`; `use_as_dflash_draft_model()` points SGLang's
`DFlashDraftModel` entry at this class (in the scheduler process, right before the draft runner is built).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layernorm import GemmaRMSNorm, RMSNorm
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from torch import nn

from dflash_sglang.config import (
    DFlashConfig,
    DFlashConfigError,
    RopeConfig,
    load_drafter_config,
    parse_drafter_config,
    yarn_mscale,
)
from dflash_sglang.kernels import PoolLayers, context_kv_norm_rope, context_kv_to_pool, pool_layers
from dflash_sglang.loader import OPTIONAL_PREFIX, expected_drafter_shapes

DRAFT_ARCHITECTURE = "DFlashDraftModel"
logger = logging.getLogger(__name__)

# Checkpoint projection -> the stacked SGLang parameter it is a shard of.
STACKED_PROJECTIONS = (
    ("self_attn.q_proj.", "self_attn.qkv_proj.", "q"),
    ("self_attn.k_proj.", "self_attn.qkv_proj.", "k"),
    ("self_attn.v_proj.", "self_attn.qkv_proj.", "v"),
    ("mlp.gate_proj.", "mlp.gate_up_proj.", 0),
    ("mlp.up_proj.", "mlp.gate_up_proj.", 1),
)


def use_as_dflash_draft_model() -> None:
    """Make SGLang build this class for `architectures: ["DFlashDraftModel"]` in this process."""
    from sglang.srt.models.registry import ModelRegistry

    ModelRegistry.models[DRAFT_ARCHITECTURE] = DFlashSGLangDrafter


def drafter_config_from_hf(hf_config) -> DFlashConfig:
    """Our config from the checkpoint's own config.json when it is on disk.

    transformers' Qwen3Config rewrites fields on load (layer_types from max_window_layers, rope_theta into
    rope_parameters), so the file is what the checkpoint means; the parsed object is the fallback.
    """
    path = getattr(hf_config, "_name_or_path", "")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return load_drafter_config(path)
    return parse_drafter_config(hf_config.to_dict())


def rope_scaling(rope: RopeConfig) -> dict | None:
    """Our RopeConfig as SGLang's `get_rope(rope_scaling=...)` dict."""
    if rope.rope_type == "default":
        return None
    if rope.rope_type == "linear":
        return {"rope_type": "linear", "factor": rope.factor}
    scaling = {"rope_type": "yarn", "factor": rope.factor, "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow}
    if rope.original_max_position_embeddings is not None:
        scaling["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.attention_factor is not None:
        # SGLang scales YaRN's default magnitude by `attn_factor`; a config's attention_factor replaces it.
        scaling["attn_factor"] = rope.attention_factor / yarn_mscale(rope.factor)
    return scaling


def make_norm(cfg: DFlashConfig, dim: int) -> nn.Module:
    return GemmaRMSNorm(dim, eps=cfg.rms_norm_eps) if cfg.use_gemma_norm else RMSNorm(dim, eps=cfg.rms_norm_eps)


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig, layer_id: int, rotary_emb: nn.Module, quant_config=None):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=cfg.attention_bias, quant_config=quant_config, prefix=f"layers.{layer_id}.self_attn.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False, quant_config=quant_config,
            prefix=f"layers.{layer_id}.self_attn.o_proj",
        )
        self.q_norm = make_norm(cfg, cfg.head_dim)
        self.k_norm = make_norm(cfg, cfg.head_dim)
        self.rotary_emb = rotary_emb
        window = cfg.layer_window(layer_id)
        self.attn = RadixAttention(
            self.num_heads,
            cfg.head_dim,
            scaling=cfg.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            layer_id=layer_id,
            # SGLang's window counts the keys left of the query; the config's includes the query itself.
            sliding_window_size=-1 if window is None else window - 1,
            attn_type=AttentionType.DECODER if cfg.is_layer_causal(layer_id) else AttentionType.ENCODER_ONLY,
            prefix=f"layers.{layer_id}.self_attn.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, forward_batch)
        out, _ = self.o_proj(out)
        return out


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig, layer_id: int, quant_config=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False, quant_config=quant_config,
            prefix=f"layers.{layer_id}.mlp.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, bias=False, quant_config=quant_config,
            prefix=f"layers.{layer_id}.mlp.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig, layer_id: int, rotary_emb: nn.Module, quant_config=None):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = DrafterAttention(cfg, layer_id, rotary_emb, quant_config)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = DrafterMLP(cfg, layer_id, quant_config)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def drafter_quant_config(quant_config):
    """The quantization the drafter's layers take: online FP8 (`--speculative-draft-model-quantization fp8`, or a
    target's `--quantization fp8` that the drafter inherits), or none.

    Published DFlash drafters ship bf16 weights, so only a method that quantizes unquantized weights while loading
    applies; one that expects quantized tensors in the checkpoint (a serialized FP8 config, AWQ, GPTQ, ModelOpt,
    ...) would find none, and MXFP8 needs a newer GPU than Hopper. Those leave the drafter in its own dtype, with a
    warning that names the flag. `fc`, the stacked context K/V projection and the norms stay unquantized: `fc` and
    the stack run once per committed token, and the stack is built from the bf16 weights before SGLang quantizes
    the layers (`post_load_weights` runs inside `load_weights`)."""
    if quant_config is None:
        return None
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    if (isinstance(quant_config, Fp8Config) and not quant_config.is_checkpoint_fp8_serialized
            and not quant_config.use_mxfp8):
        return quant_config
    logger.warning(
        "dflash_sglang: the drafter stays unquantized: %s cannot quantize its bf16 checkpoint while loading (only "
        "online FP8 can); pass --speculative-draft-model-quantization fp8 to quantize it, or unquant to silence "
        "this", quant_config.get_name())
    return None


class DFlashSGLangDrafter(nn.Module):
    """Drafter layers, `fc`, `hidden_norm` and final `norm`; embedding and head are the target's."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        """SGLang's model constructor signature; `quant_config` (`--speculative-draft-model-quantization`, which
        SGLang defaults to the target's `--quantization`) applies to the layers' linear projections when it
        quantizes bf16 weights at load (`drafter_quant_config`)."""
        super().__init__()
        self.config = config
        self.cfg = cfg = drafter_config_from_hf(config)
        self.rotary_emb = get_rope(
            cfg.head_dim,
            rotary_dim=cfg.head_dim,
            max_position=cfg.max_position_embeddings,
            base=cfg.rope.theta,
            is_neox_style=True,
            rope_scaling=rope_scaling(cfg.rope),
        )
        layer_quant = drafter_quant_config(quant_config)
        self.layers = nn.ModuleList(
            DrafterLayer(cfg, i, self.rotary_emb, layer_quant) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.fc = nn.Linear(cfg.num_target_features * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = make_norm(cfg, cfg.hidden_size)
        self.context_kv_weight: torch.Tensor | None = None
        self.context_kv_bias: torch.Tensor | None = None
        self.context_k_norm_scale: torch.Tensor | None = None
        self.target_embed: nn.Module | None = None  # use_target_embedding
        self._pool_layers: PoolLayers | None = None
        self._pool_layers_key: tuple | None = None  # the pool and buffer addresses `_pool_layers` was built from
        self._logged_per_layer_stores = False

    def use_target_embedding(self, embed: nn.Module) -> None:
        """Embed the block's ids with the target's embedding module inside the forward, so that a draft graph's
        replay reads the ids SGLang copies into it; embeddings computed outside would take a launch and a copy
        more per step. Held outside the module tree: the weights are the target's."""
        self.__dict__["target_embed"] = embed

    def get_attention_sliding_window_size(self) -> int | None:
        """SGLang sizes the backend's window buffers from this (window - 1, its left-only convention)."""
        return None if self.cfg.sliding_window is None else self.cfg.sliding_window - 1

    def embed_block(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The block's ids [bs * B] -> the target's embeddings times `input_embedding_scale`, in the drafter's dtype."""
        if self.target_embed is None:
            raise RuntimeError("the DFlash drafter embeds with the target's embedding; call use_target_embedding first")
        embeds = self.target_embed(input_ids)
        if self.cfg.input_embedding_scale != 1.0:
            embeds = embeds * self.cfg.input_embedding_scale
        return embeds.to(self.fc.weight.dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        """Block ids [bs * B] -> final-normed states [bs * B, H]. With no `input_embeds` parameter, SGLang's draft
        graphs capture the embedding too (they pass embeddings in only to forwards that take them)."""
        hidden_states = self.embed_block(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, forward_batch, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return LogitsProcessorOutput(next_token_logits=None, hidden_states=hidden_states)

    @torch.no_grad()
    def write_context_kv(
        self, features: torch.Tensor, positions: torch.Tensor, cache_loc: torch.Tensor, kv_pool
    ) -> None:
        """Target features [N, K*H] at `positions` [N] -> every layer's context K/V at slots `cache_loc` [N].

        Rows meant to be dropped point at slot 0, SGLang's padding slot, which absorbs dummy writes.
        """
        cfg = self.cfg
        num_tokens, num_layers = features.shape[0], cfg.num_hidden_layers
        first = self.layers[0].self_attn
        kv_heads, head_dim = first.num_kv_heads, cfg.head_dim
        context = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        kv = F.linear(context, self.context_kv_weight, self.context_kv_bias)
        kv = kv.view(num_tokens, num_layers, 2, kv_heads, head_dim)
        # k_norm, RoPE and the stores in one kernel for SGLang's plain pool; for any other pool, layer-major copies
        # (each layer's slice contiguous) for its own per-layer stores.
        pool = self.pool_layers(kv_pool, kv.dtype)
        if pool is not None:
            context_kv_to_pool(kv, self.context_k_norm_scale, cfg.rms_norm_eps, positions,
                               self.rotary_emb.cos_sin_cache, cache_loc, pool)
            return
        keys, values = context_kv_norm_rope(kv, self.context_k_norm_scale, cfg.rms_norm_eps, positions,
                                            self.rotary_emb.cos_sin_cache)
        for layer, layer_keys, layer_values in zip(self.layers, keys, values):
            attn = layer.self_attn.attn
            kv_pool.set_kv_buffer(attn, cache_loc, layer_keys, layer_values, attn.k_scale, attn.v_scale)

    def pool_layers(self, kv_pool, dtype: torch.dtype) -> PoolLayers | None:
        """This drafter's layer buffers in `kv_pool` when it is SGLang's plain token pool (one [S, H, D] buffer per
        layer, keys and values alike, in the context dtype, no quantization or other layout), whose per-layer
        `set_kv_buffer` is then just an indexed store: the kernel makes those stores itself. None for any other
        pool (logged once). Rebuilt when a buffer moves. Its address tables are copied to the GPU, which a CUDA
        graph capture forbids: the first call inside the target's verify graphs (verify_context.py) comes from one
        of the two eager warm-up runs SGLang makes before capturing each graph.
        """
        pool = None
        if (type(kv_pool) is MHATokenToKVPool and not kv_pool.is_quantized_kv_cache
                and kv_pool.kv_cache_layout == "nhd" and not kv_pool.use_hnd
                and not getattr(kv_pool, "post_capture_active", False)
                and kv_pool.dtype == kv_pool.store_dtype == dtype):
            indices = [layer.self_attn.attn.layer_id - kv_pool.start_layer for layer in self.layers]
            keys = [kv_pool.k_buffer[i] for i in indices]
            values = [kv_pool.v_buffer[i] for i in indices]
            key = (id(kv_pool), *(t.data_ptr() for t in keys + values))
            if key == self._pool_layers_key:
                return self._pool_layers
            try:
                pool = pool_layers(keys, values)
            except ValueError:  # e.g. values of another head dim than keys
                pool = None
            self._pool_layers, self._pool_layers_key = pool, key
        if pool is None and not self._logged_per_layer_stores:
            self._logged_per_layer_stores = True
            logger.info("dflash_sglang: context K/V stored through %s.set_kv_buffer, layer by layer",
                        type(kv_pool).__name__)
        return pool

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """z-lab names (`layers.{i}.self_attn.q_proj.weight`, `fc.weight`, ...), with or without `model.`.

        Every tensor is shape-checked against the config first; tensors the drafter does not use (a shipped
        lm_head, embeddings) are skipped; a missing or misshapen tensor fails with its name.
        """
        expected = expected_drafter_shapes(self.cfg)
        params = dict(self.named_parameters())
        loaded, errors = set(), []
        for name, tensor in weights:
            name = name.removeprefix(OPTIONAL_PREFIX)
            if name not in expected:
                continue
            if tuple(tensor.shape) != expected[name]:
                errors.append(f"drafter weights: `{name}` has shape {tuple(tensor.shape)}, expected {expected[name]}")
                continue
            for checkpoint_part, param_part, shard in STACKED_PROJECTIONS:
                if checkpoint_part in name:
                    param = params[name.replace(checkpoint_part, param_part)]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        errors += [f"drafter weights: tensor `{name}` is missing" for name in sorted(expected.keys() - loaded)]
        if errors:
            raise DFlashConfigError(errors)
        self.post_load_weights()

    @torch.no_grad()
    def post_load_weights(self) -> None:
        """Stack every layer's K/V projection and k_norm scale for the one-GEMM context path.

        Also called by SGLang's loaders that bypass `load_weights` (e.g. dummy weights). The stacked copy costs
        the K/V projection weights once more ([L * 2 * kv_size, H]), and buys one GEMM instead of L per commit.
        """
        attns = [layer.self_attn for layer in self.layers]
        self.context_kv_weight = torch.cat([a.qkv_proj.weight[a.q_size :] for a in attns]).contiguous()
        if self.cfg.attention_bias:
            self.context_kv_bias = torch.cat([a.qkv_proj.bias[a.q_size :] for a in attns]).contiguous()
        scales = torch.stack([a.k_norm.weight.float() for a in attns])
        self.context_k_norm_scale = 1.0 + scales if self.cfg.use_gemma_norm else scales


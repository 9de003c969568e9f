// Torch ops `torch.ops.dflash_sglang.*`: check every tensor (device, dtype, shape, contiguity), then fill a
// params struct and launch on the current stream. Outputs are passed in and written in full; nothing here reads
// device memory or synchronizes, so the ops are CUDA-graph capturable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <initializer_list>
#include <tuple>

#include "dflash_kernels.h"

namespace {

using at::Tensor;

// A failed check raises RuntimeError with a message formatted by vsnprintf and handed to torch as a C string.
// Not TORCH_CHECK's own formatting (c10::str, an std::ostringstream): the GPU box's g++ links libstdc++ statically
// into the library, and there a check message built that way crashed the process with SIGSEGV instead of raising,
// while a plain C-string message raised (scripts/device/extension_error_probe.py, 2026-11-29).
[[noreturn, gnu::format(printf, 1, 2)]] void fail(const char* format, ...) {
  char message[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  TORCH_CHECK(false, static_cast<const char*>(message));
  __builtin_unreachable();
}

// The message's arguments are evaluated only when the check fails: these checks run on every op call.
#define DFLASH_CHECK(cond, ...)                    \
  do {                                             \
    if (C10_UNLIKELY(!(cond))) fail(__VA_ARGS__);  \
  } while (0)

// Fixed-size text for the messages above (no std::string crosses into torch).
struct Text {
  char s[192];
};

Text dims(c10::IntArrayRef sizes) {
  Text t{"["};
  size_t used = 1;
  for (size_t i = 0; i < sizes.size() && used < sizeof(t.s); ++i)
    used += std::snprintf(t.s + used, sizeof(t.s) - used, "%s%lld", i ? ", " : "", static_cast<long long>(sizes[i]));
  if (used < sizeof(t.s)) std::snprintf(t.s + used, sizeof(t.s) - used, "]");
  return t;
}

Text device_name(const c10::Device& device) {
  Text t{};
  if (device.is_cuda()) std::snprintf(t.s, sizeof(t.s), "cuda:%d", static_cast<int>(device.index()));
  else std::snprintf(t.s, sizeof(t.s), "%s", device.is_cpu() ? "cpu" : "a non-CUDA device");
  return t;
}

const char* dtype_name(at::ScalarType dtype) { return c10::toString(dtype); }

// One declarative check per tensor: CUDA on `device`, exact dtype and shape, contiguous.
void expect(const Tensor& t, const char* name, const c10::Device& device, at::ScalarType dtype,
            std::initializer_list<int64_t> shape) {
  DFLASH_CHECK(t.device() == device, "%s must be on %s, got %s", name, device_name(device).s,
               device_name(t.device()).s);
  DFLASH_CHECK(t.scalar_type() == dtype, "%s must be %s, got %s", name, dtype_name(dtype), dtype_name(t.scalar_type()));
  DFLASH_CHECK(t.sizes().equals(shape), "%s must have shape %s, got %s", name, dims(shape).s, dims(t.sizes()).s);
  DFLASH_CHECK(t.is_contiguous(), "%s must be contiguous", name);
}

void build_tree(const Tensor& root_tokens, const Tensor& topk_logprobs, const Tensor& topk_ids,
                const Tensor& start_positions, int64_t budget, const Tensor& tokens, const Tensor& parents,
                const Tensor& depths, const Tensor& positions, const Tensor& first_child, const Tensor& next_sibling,
                const Tensor& ancestor_mask) {
  DFLASH_CHECK(topk_logprobs.dim() == 3, "topk_logprobs must be [bs, depth, topk]");
  const auto device = topk_logprobs.device();
  DFLASH_CHECK(device.is_cuda(), "topk_logprobs must be a CUDA tensor");
  const int64_t bs = topk_logprobs.size(0), depth = topk_logprobs.size(1), topk = topk_logprobs.size(2);
  DFLASH_CHECK(depth >= 1 && depth <= dflash::kMaxTreeDepth, "depth must be in [1, %d]", int(dflash::kMaxTreeDepth));
  DFLASH_CHECK(topk >= 1 && topk <= dflash::kMaxTreeTopk, "topk must be in [1, %d]", int(dflash::kMaxTreeTopk));
  DFLASH_CHECK(depth * topk <= dflash::kMaxTopkTable, "depth * topk must be <= %d", int(dflash::kMaxTopkTable));
  DFLASH_CHECK(budget >= 0 && budget <= dflash::kMaxTreeBudget,
               "budget must be in [0, %d] (clamp it to the number of distinct prefixes first)",
               int(dflash::kMaxTreeBudget));
  const int64_t n = budget + 1;
  expect(topk_logprobs, "topk_logprobs", device, at::kFloat, {bs, depth, topk});
  expect(topk_ids, "topk_ids", device, at::kLong, {bs, depth, topk});
  expect(root_tokens, "root_tokens", device, at::kLong, {bs});
  expect(start_positions, "start_positions", device, at::kLong, {bs});
  expect(tokens, "tokens", device, at::kLong, {bs, n});
  expect(parents, "parents", device, at::kInt, {bs, n});
  expect(depths, "depths", device, at::kInt, {bs, n});
  expect(positions, "positions", device, at::kLong, {bs, n});
  expect(first_child, "first_child", device, at::kInt, {bs, n});
  expect(next_sibling, "next_sibling", device, at::kInt, {bs, n});
  expect(ancestor_mask, "ancestor_mask", device, at::kBool, {bs, n, n});

  const c10::cuda::CUDAGuard guard(device);
  dflash::BuildTreeParams p{};
  p.root_tokens = root_tokens.data_ptr<int64_t>();
  p.topk_logprobs = topk_logprobs.data_ptr<float>();
  p.topk_ids = topk_ids.data_ptr<int64_t>();
  p.start_positions = start_positions.data_ptr<int64_t>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.parents = parents.data_ptr<int32_t>();
  p.depths = depths.data_ptr<int32_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.first_child = first_child.data_ptr<int32_t>();
  p.next_sibling = next_sibling.data_ptr<int32_t>();
  p.ancestor_mask = ancestor_mask.data_ptr<bool>();
  p.bs = int(bs);
  p.depth = int(depth);
  p.topk = int(topk);
  p.budget = int(budget);
  C10_CUDA_CHECK(dflash::launch_build_tree(p, c10::cuda::getCurrentCUDAStream()));
}

// Shared checks of the tree and output tensors of both verifiers; returns (bs, n, max_depth).
std::tuple<int64_t, int64_t, int64_t> check_verify_tree(const Tensor& tokens, const Tensor& first_child,
                                                        const Tensor& next_sibling, const Tensor& path,
                                                        const Tensor& accept_len, const Tensor& bonus,
                                                        const Tensor& emitted) {
  DFLASH_CHECK(tokens.dim() == 2 && path.dim() == 2, "tokens must be [bs, n] and path [bs, max_depth + 1]");
  const auto device = tokens.device();
  DFLASH_CHECK(device.is_cuda(), "tokens must be a CUDA tensor");
  const int64_t bs = tokens.size(0), n = tokens.size(1), width = path.size(1);
  DFLASH_CHECK(n >= 1 && n <= dflash::kMaxVerifyNodes, "number of tree nodes must be in [1, %d]",
               int(dflash::kMaxVerifyNodes));
  DFLASH_CHECK(width >= 1 && width <= dflash::kMaxVerifyNodes, "path must have max_depth + 1 in [1, %d] columns",
               int(dflash::kMaxVerifyNodes));
  expect(tokens, "tokens", device, at::kLong, {bs, n});
  expect(first_child, "first_child", device, at::kInt, {bs, n});
  expect(next_sibling, "next_sibling", device, at::kInt, {bs, n});
  expect(path, "path", device, at::kInt, {bs, width});
  expect(accept_len, "accept_len", device, at::kInt, {bs});
  expect(bonus, "bonus", device, at::kLong, {bs});
  expect(emitted, "emitted", device, at::kLong, {bs, width});
  return {bs, n, width - 1};
}

void verify_tree_greedy(const Tensor& tokens, const Tensor& first_child, const Tensor& next_sibling,
                        const Tensor& target_predict, const Tensor& path, const Tensor& accept_len,
                        const Tensor& bonus, const Tensor& emitted) {
  const auto [bs, n, max_depth] =
      check_verify_tree(tokens, first_child, next_sibling, path, accept_len, bonus, emitted);
  expect(target_predict, "target_predict", tokens.device(), at::kLong, {bs, n});

  const c10::cuda::CUDAGuard guard(tokens.device());
  dflash::VerifyGreedyParams p{};
  p.tokens = tokens.data_ptr<int64_t>();
  p.first_child = first_child.data_ptr<int32_t>();
  p.next_sibling = next_sibling.data_ptr<int32_t>();
  p.target_predict = target_predict.data_ptr<int64_t>();
  p.path = path.data_ptr<int32_t>();
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.bonus = bonus.data_ptr<int64_t>();
  p.emitted = emitted.data_ptr<int64_t>();
  p.bs = int(bs);
  p.num_nodes = int(n);
  p.max_depth = int(max_depth);
  C10_CUDA_CHECK(dflash::launch_verify_greedy(p, c10::cuda::getCurrentCUDAStream()));
}

void verify_tree_sampling(const Tensor& tokens, const Tensor& first_child, const Tensor& next_sibling,
                          const Tensor& target_probs, const Tensor& coins, const Tensor& race, const Tensor& path,
                          const Tensor& accept_len, const Tensor& bonus, const Tensor& emitted) {
  const auto [bs, n, max_depth] =
      check_verify_tree(tokens, first_child, next_sibling, path, accept_len, bonus, emitted);
  const auto device = tokens.device();
  DFLASH_CHECK(target_probs.dim() == 3, "target_probs must be [bs, n, V]");
  const int64_t vocab = target_probs.size(2);
  DFLASH_CHECK(vocab >= 1 && vocab <= int64_t(UINT32_MAX), "vocabulary size must be in [1, 2^32)");
  expect(target_probs, "target_probs", device, at::kFloat, {bs, n, vocab});
  expect(coins, "coins", device, at::kFloat, {bs, n});
  expect(race, "race", device, at::kFloat, {bs, vocab});
  if (vocab % 4 == 0) {
    DFLASH_CHECK(reinterpret_cast<uintptr_t>(target_probs.data_ptr()) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(race.data_ptr()) % 16 == 0,
                 "target_probs and race must be 16-byte aligned");
  }

  const c10::cuda::CUDAGuard guard(device);
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device.index()));
  // Enough CTAs to fill the GPU about twice, but at least 8 float4 loads per thread.
  constexpr int64_t kMinChunk = 256 * 4 * 8;
  const int64_t wanted_chunks = std::max<int64_t>(1, (2 * int64_t(num_sms) + bs - 1) / std::max<int64_t>(bs, 1));
  const int64_t max_chunks = std::max<int64_t>(1, (vocab + kMinChunk - 1) / kMinChunk);
  const int64_t num_chunks = std::min(wanted_chunks, max_chunks);
  const int64_t chunk = ((vocab + num_chunks - 1) / num_chunks + 3) / 4 * 4;

  // Workspace words: per request the race key (u64) and the arrival count (u32), zeroed by one memset.
  const Tensor workspace = at::zeros({3 * bs}, tokens.options().dtype(at::kInt));
  dflash::VerifySamplingParams p{};
  p.tokens = tokens.data_ptr<int64_t>();
  p.first_child = first_child.data_ptr<int32_t>();
  p.next_sibling = next_sibling.data_ptr<int32_t>();
  p.target_probs = target_probs.data_ptr<float>();
  p.coins = coins.data_ptr<float>();
  p.race = race.data_ptr<float>();
  p.path = path.data_ptr<int32_t>();
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.bonus = bonus.data_ptr<int64_t>();
  p.emitted = emitted.data_ptr<int64_t>();
  p.best_keys = reinterpret_cast<unsigned long long*>(workspace.data_ptr<int32_t>());
  p.arrivals = reinterpret_cast<unsigned int*>(workspace.data_ptr<int32_t>() + 2 * bs);
  p.bs = int(bs);
  p.num_nodes = int(n);
  p.max_depth = int(max_depth);
  p.vocab = vocab;
  p.chunk = chunk;
  p.num_chunks = int((vocab + chunk - 1) / chunk);
  C10_CUDA_CHECK(dflash::launch_verify_sampling(p, c10::cuda::getCurrentCUDAStream()));
}

void check_slot_table(const Tensor& req_to_token, const c10::Device& device) {
  DFLASH_CHECK(req_to_token.dim() == 2 && req_to_token.device() == device && req_to_token.scalar_type() == at::kInt &&
                   req_to_token.stride(1) == 1,
               "req_to_token must be an int32 [R, max_len] table with contiguous rows on %s", device_name(device).s);
}

void tree_verify_inputs(const Tensor& ancestor_mask, const Tensor& seq_lens, const Tensor& req_pool_indices,
                        const Tensor& req_to_token, const Tensor& verify_slots, const Tensor& mask) {
  DFLASH_CHECK(ancestor_mask.dim() == 3 && ancestor_mask.size(1) == ancestor_mask.size(2),
               "ancestor_mask must be [bs, W, W], got %s", dims(ancestor_mask.sizes()).s);
  const auto device = ancestor_mask.device();
  DFLASH_CHECK(device.is_cuda(), "ancestor_mask must be a CUDA tensor");
  const int64_t bs = ancestor_mask.size(0), width = ancestor_mask.size(1);
  // The grid is (bs + 1, W): CUDA's second grid dimension holds at most 65535.
  DFLASH_CHECK(bs < INT32_MAX && width <= 65535, "too many requests or tree nodes");
  DFLASH_CHECK(mask.dim() == 1, "mask must be flat, got %s", dims(mask.sizes()).s);
  expect(ancestor_mask, "ancestor_mask", device, at::kBool, {bs, width, width});
  expect(seq_lens, "seq_lens", device, at::kLong, {bs});
  expect(req_pool_indices, "req_pool_indices", device, at::kLong, {bs});
  check_slot_table(req_to_token, device);
  expect(verify_slots, "verify_slots", device, at::kLong, {bs, width});
  expect(mask, "mask", device, at::kBool, {mask.size(0)});

  const c10::cuda::CUDAGuard guard(device);
  dflash::VerifyInputsParams p{};
  p.ancestor_mask = ancestor_mask.data_ptr<bool>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.req_pool_indices = req_pool_indices.data_ptr<int64_t>();
  p.req_to_token = req_to_token.data_ptr<int32_t>();
  p.row_stride = req_to_token.stride(0);
  p.verify_slots = verify_slots.data_ptr<int64_t>();
  p.mask = mask.data_ptr<bool>();
  p.mask_size = mask.size(0);
  p.bs = int(bs);
  p.width = int(width);
  C10_CUDA_CHECK(dflash::launch_verify_inputs(p, c10::cuda::getCurrentCUDAStream()));
}

void commit_tree(const Tensor& req_to_token, const Tensor& req_pool_indices, const Tensor& seq_lens,
                 const Tensor& path, const Tensor& accept_len, const Tensor& verified_emitted, int64_t num_nodes,
                 const Tensor& commit_lens, const Tensor& new_seq_lens, const Tensor& emitted) {
  DFLASH_CHECK(path.dim() == 2, "path must be [bs, max_depth + 1], got %s", dims(path.sizes()).s);
  const auto device = path.device();
  DFLASH_CHECK(device.is_cuda(), "path must be a CUDA tensor");
  const int64_t bs = path.size(0), width = path.size(1);
  DFLASH_CHECK(num_nodes >= 1 && num_nodes <= dflash::kMaxVerifyNodes && width >= 1 &&
                   width <= dflash::kMaxVerifyNodes,
               "number of tree nodes (%lld) and max_depth + 1 (%lld) must be in [1, %d]",
               static_cast<long long>(num_nodes), static_cast<long long>(width), int(dflash::kMaxVerifyNodes));
  DFLASH_CHECK(bs <= INT32_MAX, "too many requests");
  check_slot_table(req_to_token, device);
  expect(req_pool_indices, "req_pool_indices", device, at::kLong, {bs});
  expect(seq_lens, "seq_lens", device, at::kLong, {bs});
  expect(path, "path", device, at::kInt, {bs, width});
  expect(accept_len, "accept_len", device, at::kInt, {bs});
  expect(verified_emitted, "verified_emitted", device, at::kLong, {bs, width});
  expect(commit_lens, "commit_lens", device, at::kInt, {bs});
  expect(new_seq_lens, "new_seq_lens", device, at::kLong, {bs});
  expect(emitted, "emitted", device, at::kLong, {bs, width});

  const c10::cuda::CUDAGuard guard(device);
  dflash::CommitTreeParams p{};
  p.req_to_token = req_to_token.data_ptr<int32_t>();
  p.row_stride = req_to_token.stride(0);
  p.req_pool_indices = req_pool_indices.data_ptr<int64_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.path = path.data_ptr<int32_t>();
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.verified_emitted = verified_emitted.data_ptr<int64_t>();
  p.commit_lens = commit_lens.data_ptr<int32_t>();
  p.new_seq_lens = new_seq_lens.data_ptr<int64_t>();
  p.emitted = emitted.data_ptr<int64_t>();
  p.bs = int(bs);
  p.num_nodes = int(num_nodes);
  p.max_depth = int(width - 1);
  C10_CUDA_CHECK(dflash::launch_commit_tree(p, c10::cuda::getCurrentCUDAStream()));
}

bool is_context_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

dflash::ElementType element_type(at::ScalarType dtype) {
  return dtype == at::kFloat  ? dflash::ElementType::kFloat32
         : dtype == at::kHalf ? dflash::ElementType::kFloat16
                              : dflash::ElementType::kBFloat16;
}

// The checks and launch parameters both context K/V ops share: the GEMM output, the norm scales, positions, cache.
dflash::ContextKVParams context_kv_params(const Tensor& kv, const Tensor& k_norm_scale, double eps,
                                          const Tensor& positions, const Tensor& cos_sin_cache) {
  DFLASH_CHECK(kv.dim() == 5 && kv.size(2) == 2, "kv must be [N, L, 2, H, D], got %s", dims(kv.sizes()).s);
  const auto device = kv.device();
  DFLASH_CHECK(device.is_cuda(), "kv must be a CUDA tensor");
  const auto dtype = kv.scalar_type();
  DFLASH_CHECK(is_context_dtype(dtype), "kv must be float32, float16 or bfloat16, got %s", dtype_name(dtype));
  const int64_t tokens = kv.size(0), layers = kv.size(1), heads = kv.size(3), head_dim = kv.size(4);
  DFLASH_CHECK(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= dflash::kMaxContextHeadDim,
               "head_dim must be even and in [2, %d], got %lld", int(dflash::kMaxContextHeadDim),
               static_cast<long long>(head_dim));
  DFLASH_CHECK(layers <= INT32_MAX && heads <= INT32_MAX, "too many layers or heads");
  expect(kv, "kv", device, dtype, {tokens, layers, 2, heads, head_dim});
  expect(k_norm_scale, "k_norm_scale", device, at::kFloat, {layers, head_dim});
  expect(positions, "positions", device, at::kLong, {tokens});
  DFLASH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim && cos_sin_cache.size(0) >= 1,
               "cos_sin_cache must be [max_position >= 1, head_dim = %lld], got %s", static_cast<long long>(head_dim),
               dims(cos_sin_cache.sizes()).s);
  DFLASH_CHECK(cos_sin_cache.device() == device, "cos_sin_cache must be on %s", device_name(device).s);
  DFLASH_CHECK(cos_sin_cache.scalar_type() == at::kFloat || cos_sin_cache.scalar_type() == dtype,
               "cos_sin_cache must be float32 or %s, got %s", dtype_name(dtype),
               dtype_name(cos_sin_cache.scalar_type()));
  DFLASH_CHECK(cos_sin_cache.stride(1) == 1, "cos_sin_cache rows must be contiguous");

  dflash::ContextKVParams p{};
  p.kv = kv.data_ptr();
  p.k_norm_scale = k_norm_scale.data_ptr<float>();
  p.positions = positions.data_ptr<int64_t>();
  p.cos_sin_cache = cos_sin_cache.data_ptr();
  p.eps = float(eps);
  p.num_tokens = tokens;
  p.num_layers = int(layers);
  p.num_heads = int(heads);
  p.head_dim = int(head_dim);
  p.max_position = cos_sin_cache.size(0);
  p.cache_row_stride = cos_sin_cache.stride(0);
  p.dtype = element_type(dtype);
  p.cache_dtype = element_type(cos_sin_cache.scalar_type());
  return p;
}

void context_kv_norm_rope(const Tensor& kv, const Tensor& k_norm_scale, double eps, const Tensor& positions,
                          const Tensor& cos_sin_cache, const Tensor& keys, const Tensor& values) {
  dflash::ContextKVParams p = context_kv_params(kv, k_norm_scale, eps, positions, cos_sin_cache);
  const auto device = kv.device();
  expect(keys, "keys", device, kv.scalar_type(), {p.num_layers, p.num_tokens, p.num_heads, p.head_dim});
  expect(values, "values", device, kv.scalar_type(), {p.num_layers, p.num_tokens, p.num_heads, p.head_dim});
  p.keys = keys.data_ptr();
  p.values = values.data_ptr();
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(dflash::launch_context_kv(p, c10::cuda::getCurrentCUDAStream()));
}

// The pool's buffers are the caller's to vouch for (dflash_sglang/kernels/context_kv.py builds the address tables
// from live [S, H, D] tensors of kv's dtype); slots are not bounds-checked, as SGLang's own store does not.
void context_kv_to_pool(const Tensor& kv, const Tensor& k_norm_scale, double eps, const Tensor& positions,
                        const Tensor& cos_sin_cache, const Tensor& key_layers, const Tensor& value_layers,
                        const Tensor& slots, int64_t slot_stride, int64_t pool_alignment) {
  dflash::ContextKVParams p = context_kv_params(kv, k_norm_scale, eps, positions, cos_sin_cache);
  const auto device = kv.device();
  expect(key_layers, "key_layers", device, at::kLong, {p.num_layers});
  expect(value_layers, "value_layers", device, at::kLong, {p.num_layers});
  expect(slots, "slots", device, at::kLong, {p.num_tokens});
  const int64_t slot_size = int64_t(p.num_heads) * p.head_dim;
  DFLASH_CHECK(slot_stride >= slot_size, "slot_stride %lld is smaller than a slot (H * D = %lld)",
               static_cast<long long>(slot_stride), static_cast<long long>(slot_size));
  DFLASH_CHECK(pool_alignment >= 1, "pool_alignment must be positive");
  p.key_layers = key_layers.data_ptr<int64_t>();
  p.value_layers = value_layers.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.slot_stride = slot_stride;
  p.pool_alignment = pool_alignment;
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(dflash::launch_context_kv(p, c10::cuda::getCurrentCUDAStream()));
}

void chain_block(const Tensor& bonus, const Tensor& seq_lens, const Tensor& req_pool_indices,
                 const Tensor& req_to_token, int64_t mask_token_id, const Tensor& block_ids, const Tensor& positions,
                 const Tensor& slots) {
  DFLASH_CHECK(block_ids.dim() == 2, "block_ids must be [bs, B], got %s", dims(block_ids.sizes()).s);
  const auto device = block_ids.device();
  DFLASH_CHECK(device.is_cuda(), "block_ids must be a CUDA tensor");
  const int64_t bs = block_ids.size(0), block = block_ids.size(1);
  DFLASH_CHECK(bs <= INT32_MAX && block <= INT32_MAX, "too many requests or block positions");
  expect(bonus, "bonus", device, at::kLong, {bs});
  expect(seq_lens, "seq_lens", device, at::kLong, {bs});
  expect(req_pool_indices, "req_pool_indices", device, at::kLong, {bs});
  check_slot_table(req_to_token, device);
  expect(block_ids, "block_ids", device, at::kLong, {bs, block});
  expect(positions, "positions", device, at::kLong, {bs, block});
  expect(slots, "slots", device, at::kLong, {bs, block});

  const c10::cuda::CUDAGuard guard(device);
  dflash::ChainBlockParams p{};
  p.bonus = bonus.data_ptr<int64_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.req_pool_indices = req_pool_indices.data_ptr<int64_t>();
  p.req_to_token = req_to_token.data_ptr<int32_t>();
  p.row_stride = req_to_token.stride(0);
  p.mask_token_id = mask_token_id;
  p.block_ids = block_ids.data_ptr<int64_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.bs = int(bs);
  p.block_size = int(block);
  C10_CUDA_CHECK(dflash::launch_chain_block(p, c10::cuda::getCurrentCUDAStream()));
}

void chain_accept_greedy(const Tensor& candidates, const Tensor& predicted, const Tensor& seq_lens,
                         const Tensor& accept_len, const Tensor& commit_lens, const Tensor& bonus,
                         const Tensor& new_seq_lens, const Tensor& emitted) {
  DFLASH_CHECK(candidates.dim() == 2 && candidates.size(1) >= 1, "candidates must be [bs, B >= 1], got %s",
               dims(candidates.sizes()).s);
  const auto device = candidates.device();
  DFLASH_CHECK(device.is_cuda(), "candidates must be a CUDA tensor");
  const int64_t bs = candidates.size(0), block = candidates.size(1);
  DFLASH_CHECK(bs <= INT32_MAX && block <= INT32_MAX, "too many requests or block positions");
  expect(candidates, "candidates", device, at::kLong, {bs, block});
  expect(predicted, "predicted", device, at::kLong, {bs, block});
  expect(seq_lens, "seq_lens", device, at::kLong, {bs});
  expect(accept_len, "accept_len", device, at::kInt, {bs});
  expect(commit_lens, "commit_lens", device, at::kInt, {bs});
  expect(bonus, "bonus", device, at::kLong, {bs});
  expect(new_seq_lens, "new_seq_lens", device, at::kLong, {bs});
  expect(emitted, "emitted", device, at::kLong, {bs, block});

  const c10::cuda::CUDAGuard guard(device);
  dflash::ChainAcceptParams p{};
  p.candidates = candidates.data_ptr<int64_t>();
  p.predicted = predicted.data_ptr<int64_t>();
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.accept_len = accept_len.data_ptr<int32_t>();
  p.commit_lens = commit_lens.data_ptr<int32_t>();
  p.bonus = bonus.data_ptr<int64_t>();
  p.new_seq_lens = new_seq_lens.data_ptr<int64_t>();
  p.emitted = emitted.data_ptr<int64_t>();
  p.bs = int(bs);
  p.block_size = int(block);
  C10_CUDA_CHECK(dflash::launch_chain_accept(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY(dflash_sglang, m) {
  m.def(
      "build_tree(Tensor root_tokens, Tensor topk_logprobs, Tensor topk_ids, Tensor start_positions, int budget, "
      "Tensor(a!) tokens, Tensor(b!) parents, Tensor(c!) depths, Tensor(d!) positions, Tensor(e!) first_child, "
      "Tensor(f!) next_sibling, Tensor(g!) ancestor_mask) -> ()");
  m.def(
      "verify_tree_greedy(Tensor tokens, Tensor first_child, Tensor next_sibling, Tensor target_predict, "
      "Tensor(a!) path, Tensor(b!) accept_len, Tensor(c!) bonus, Tensor(d!) emitted) -> ()");
  m.def(
      "verify_tree_sampling(Tensor tokens, Tensor first_child, Tensor next_sibling, Tensor target_probs, "
      "Tensor coins, Tensor race, Tensor(a!) path, Tensor(b!) accept_len, Tensor(c!) bonus, Tensor(d!) emitted) "
      "-> ()");
  m.def(
      "tree_verify_inputs(Tensor ancestor_mask, Tensor seq_lens, Tensor req_pool_indices, Tensor req_to_token, "
      "Tensor(a!) verify_slots, Tensor(b!) mask) -> ()");
  m.def(
      "commit_tree(Tensor(a!) req_to_token, Tensor req_pool_indices, Tensor seq_lens, Tensor path, "
      "Tensor accept_len, Tensor verified_emitted, int num_nodes, Tensor(b!) commit_lens, Tensor(c!) new_seq_lens, "
      "Tensor(d!) emitted) -> ()");
  m.def(
      "context_kv_norm_rope(Tensor kv, Tensor k_norm_scale, float eps, Tensor positions, Tensor cos_sin_cache, "
      "Tensor(a!) keys, Tensor(b!) values) -> ()");
  // The pool's layer buffers are written through the address tables: the schema cannot name them as mutated.
  m.def(
      "context_kv_to_pool(Tensor kv, Tensor k_norm_scale, float eps, Tensor positions, Tensor cos_sin_cache, "
      "Tensor key_layers, Tensor value_layers, Tensor slots, int slot_stride, int pool_alignment) -> ()");
  m.def(
      "chain_block(Tensor bonus, Tensor seq_lens, Tensor req_pool_indices, Tensor req_to_token, int mask_token_id, "
      "Tensor(a!) block_ids, Tensor(b!) positions, Tensor(c!) slots) -> ()");
  m.def(
      "chain_accept_greedy(Tensor candidates, Tensor predicted, Tensor seq_lens, "
      "Tensor(a!) accept_len, Tensor(b!) commit_lens, Tensor(c!) bonus, Tensor(d!) new_seq_lens, "
      "Tensor(e!) emitted) -> ()");
}

TORCH_LIBRARY_IMPL(dflash_sglang, CUDA, m) {
  m.impl("build_tree", &build_tree);
  m.impl("verify_tree_greedy", &verify_tree_greedy);
  m.impl("verify_tree_sampling", &verify_tree_sampling);
  m.impl("tree_verify_inputs", &tree_verify_inputs);
  m.impl("commit_tree", &commit_tree);
  m.impl("context_kv_norm_rope", &context_kv_norm_rope);
  m.impl("context_kv_to_pool", &context_kv_to_pool);
  m.impl("chain_block", &chain_block);
  m.impl("chain_accept_greedy", &chain_accept_greedy);
}

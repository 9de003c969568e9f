// Context K/V of the DFlash drafter, after its one K/V GEMM: RMSNorm of every layer's keys with that layer's
// scale, neox RoPE at each token's position, and the layer-major layout the KV pool's store takes, in one launch.
//
// One row is the head_dim vector of one (layer, token, head). A group of G lanes (a power of two <= 32, so a row
// never straddles a warp) owns a row: lane t holds the vectors t, t + G, ... of both rotation halves in registers,
// the sum of squares is reduced with shuffles inside the group, then each lane normalizes, rotates and stores
// what it holds, and copies the row's values. Rows are numbered in output order ((l * N + n) * H + h), so the
// stores of a CTA are one contiguous stretch. In pool mode the same rows land in the KV pool instead, each at its
// token's slot of its layer's buffers: SGLang's per-layer stores, folded into this launch.
//
// Arithmetic is the torch reference's, operation for operation: x * (1 / rms) then * scale in float32, rounded
// to the kv dtype (the norm's output dtype, as in the reference drafter), then first * cos - second * sin and
// second * cos + first * sin in float32 with separately rounded products (no FMA contraction), rounded once
// more. Only 1 / rms can differ from the reference in its last bit (summation order of the squares).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kContextThreads = 256;
constexpr int kWarp = 32;
// A lane holds at most this many rotation pairs: kMaxContextHeadDim / 2 pairs over a 32-lane group.
constexpr int kMaxPairsPerLane = kMaxContextHeadDim / 2 / kWarp;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Rounding to T and back: the value the reference holds after its cast to the kv dtype.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// kVec consecutive elements moved as one aligned access (the launcher checks the alignment).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(src);
#pragma unroll
  for (int i = 0; i < kVec; ++i) dst[i] = to_float(pack.v[i]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_floats(T* dst, const float (&src)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pack.v[i] = from_float<T>(src[i]);
  *reinterpret_cast<Pack<T, kVec>*>(dst) = pack;
}

// T: kv/keys/values element type; C: cos/sin cache element type (float or T); kVec: elements per access.
template <typename T, typename C, int kVec>
__global__ void __launch_bounds__(kContextThreads)
    context_kv_kernel(const __grid_constant__ ContextKVParams p, const int group) {
  // Vectors per lane and half: a 32-lane group covers kMaxContextHeadDim / 2 pairs in this many steps.
  constexpr int kSteps = kMaxPairsPerLane >= kVec ? kMaxPairsPerLane / kVec : 1;
  const int head_dim = p.head_dim, half = head_dim / 2, vecs = half / kVec;
  const int64_t num_rows = int64_t(p.num_layers) * p.num_tokens * p.num_heads;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / group;
  const int lane = threadIdx.x & (group - 1);
  // Lanes past the last row still join the shuffles below (whole warps shuffle), with nothing loaded.
  const bool active = row < num_rows;
  const int64_t h = active ? row % p.num_heads : 0;
  const int64_t token_layer = active ? row / p.num_heads : 0;
  const int64_t n = token_layer % p.num_tokens, l = token_layer / p.num_tokens;

  const int64_t head_stride = p.num_heads * int64_t(head_dim);
  const T* key_in = static_cast<const T*>(p.kv) + (n * p.num_layers + l) * 2 * head_stride + h * head_dim;

  float first[kSteps][kVec], second[kSteps][kVec];
  float sum_sq = 0.0f;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int j = lane + s * group;
    if (active && j < vecs) {
      load_floats<T, kVec>(key_in + j * kVec, first[s]);
      load_floats<T, kVec>(key_in + half + j * kVec, second[s]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum_sq += first[s][i] * first[s][i] + second[s][i] * second[s][i];
    }
  }
  for (int offset = group / 2; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xFFFFFFFFu, sum_sq, offset);
  if (!active) return;

  const float inv_rms = rsqrtf(sum_sq / float(head_dim) + p.eps);
  // Positions outside the cache are clamped (the reference raises): never read outside it.
  const int64_t pos = min(max(p.positions[n], int64_t(0)), p.max_position - 1);
  const C* cos_row = static_cast<const C*>(p.cos_sin_cache) + pos * p.cache_row_stride;
  const C* sin_row = cos_row + half;
  const float* scale = p.k_norm_scale + l * head_dim;
  T* key_out;
  T* row_value_out;
  if (p.key_layers != nullptr) {
    const int64_t offset = p.slots[n] * p.slot_stride + h * head_dim;
    key_out = reinterpret_cast<T*>(p.key_layers[l]) + offset;
    row_value_out = reinterpret_cast<T*>(p.value_layers[l]) + offset;
  } else {
    key_out = static_cast<T*>(p.keys) + row * head_dim;
    row_value_out = static_cast<T*>(p.values) + row * head_dim;
  }
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int j = lane + s * group;
    if (j < vecs) {
      float cos_v[kVec], sin_v[kVec], scale_first[kVec], scale_second[kVec], out_first[kVec], out_second[kVec];
      load_floats<C, kVec>(cos_row + j * kVec, cos_v);
      load_floats<C, kVec>(sin_row + j * kVec, sin_v);
      load_floats<float, kVec>(scale + j * kVec, scale_first);
      load_floats<float, kVec>(scale + half + j * kVec, scale_second);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float a = round_to<T>(__fmul_rn(__fmul_rn(first[s][i], inv_rms), scale_first[i]));
        const float b = round_to<T>(__fmul_rn(__fmul_rn(second[s][i], inv_rms), scale_second[i]));
        out_first[i] = __fsub_rn(__fmul_rn(a, cos_v[i]), __fmul_rn(b, sin_v[i]));
        out_second[i] = __fadd_rn(__fmul_rn(b, cos_v[i]), __fmul_rn(a, sin_v[i]));
      }
      store_floats<T, kVec>(key_out + j * kVec, out_first);
      store_floats<T, kVec>(key_out + half + j * kVec, out_second);
    }
  }

  using Vec = Pack<T, kVec>;
  const Vec* value_in = reinterpret_cast<const Vec*>(key_in + head_stride);
  Vec* value_out = reinterpret_cast<Vec*>(row_value_out);
  for (int j = lane; j < head_dim / kVec; j += group) value_out[j] = value_in[j];
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % uint64_t(bytes) == 0; }

template <typename T, typename C>
cudaError_t launch_typed(const ContextKVParams& p, cudaStream_t stream) {
  // 16-byte accesses when the head halves, the cache rows and every base address allow them, else per element.
  constexpr int kWide = 16 / sizeof(T);
  const int half = p.head_dim / 2;
  const bool outputs_aligned = p.key_layers != nullptr
                                   ? p.pool_alignment % int64_t(kWide * sizeof(T)) == 0
                                   : aligned(p.keys, kWide * sizeof(T)) && aligned(p.values, kWide * sizeof(T));
  const bool wide = half % kWide == 0 && p.cache_row_stride % kWide == 0 && aligned(p.kv, kWide * sizeof(T)) &&
                    outputs_aligned && aligned(p.cos_sin_cache, kWide * sizeof(C)) &&
                    aligned(p.k_norm_scale, kWide * sizeof(float));
  const int vec = wide ? kWide : 1;
  int group = 1;
  while (group < kWarp && group < half / vec) group *= 2;
  const int64_t rows = int64_t(p.num_layers) * p.num_tokens * p.num_heads;
  const int64_t blocks = (rows * group + kContextThreads - 1) / kContextThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (wide) {
    context_kv_kernel<T, C, kWide><<<unsigned(blocks), kContextThreads, 0, stream>>>(p, group);
  } else {
    context_kv_kernel<T, C, 1><<<unsigned(blocks), kContextThreads, 0, stream>>>(p, group);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_with_cache(const ContextKVParams& p, cudaStream_t stream) {
  return p.cache_dtype == ElementType::kFloat32 ? launch_typed<T, float>(p, stream) : launch_typed<T, T>(p, stream);
}

}  // namespace

cudaError_t launch_context_kv(const ContextKVParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0 || params.num_layers == 0 || params.num_heads == 0) return cudaSuccess;
  if (params.head_dim < 2 || params.head_dim % 2 != 0 || params.head_dim > kMaxContextHeadDim ||
      params.max_position < 1 || (params.cache_dtype != ElementType::kFloat32 && params.cache_dtype != params.dtype)) {
    return cudaErrorInvalidValue;
  }
  switch (params.dtype) {
    case ElementType::kFloat32:
      return launch_typed<float, float>(params, stream);
    case ElementType::kFloat16:
      return launch_with_cache<__half>(params, stream);
    case ElementType::kBFloat16:
      return launch_with_cache<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dflash

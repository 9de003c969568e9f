// What a tree verify needs besides its tokens and positions, in one launch: each request's verify KV slots (the
// W reserved columns after its committed length) and the flat custom attention mask in the layout of SGLang's
// triton backend: request b owns W rows of (seq_len_b + W) bytes, requests back to back; row i sees every
// committed token and the tree nodes that are itself or its ancestors. The mask buffer's size is a host-side
// bound (the planning lengths); the tail past the requests' rows is set to 1, as the reference does.
//
// Grid (bs + 1, W): CTA (b, i) writes row i of request b (and CTA (b, 0) its slots); the extra column of CTAs
// (b = bs) splits the tail. Each CTA finds its request's offset by summing the rows before it, a few hundred
// loads at most, instead of a separate scan launch.
#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kMaskThreads = 256;

// sum over requests b' < end of width * (seq_lens[b'] + width), reduced over the CTA.
__device__ int64_t mask_offset(const int64_t* seq_lens, int end, int width) {
  __shared__ int64_t partial[kMaskThreads / 32];
  int64_t sum = 0;
  for (int b = threadIdx.x; b < end; b += blockDim.x) sum += int64_t(width) * (seq_lens[b] + width);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  int64_t total = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += partial[w];
  return total;
}

__global__ void __launch_bounds__(kMaskThreads) verify_inputs_kernel(const __grid_constant__ VerifyInputsParams p) {
  const int b = blockIdx.x;
  const int i = blockIdx.y;
  const int width = p.width;
  const int64_t start = mask_offset(p.seq_lens, b, width);
  if (b == p.bs) {
    // The tail [start, mask_size), split over the W CTAs of this column.
    const int64_t tail = p.mask_size > start ? p.mask_size - start : 0;
    const int64_t per_cta = (tail + width - 1) / width;
    const int64_t lo = start + int64_t(i) * per_cta;
    const int64_t hi = min(lo + per_cta, p.mask_size);
    for (int64_t k = lo + threadIdx.x; k < hi; k += blockDim.x) p.mask[k] = true;
    return;
  }
  const int64_t seq_len = p.seq_lens[b];
  const int64_t row_len = seq_len + width;
  if (i == 0) {
    const int32_t* row = p.req_to_token + p.req_pool_indices[b] * p.row_stride + seq_len;
    for (int j = threadIdx.x; j < width; j += blockDim.x) p.verify_slots[int64_t(b) * width + j] = row[j];
  }
  const int64_t row_start = start + int64_t(i) * row_len;
  const bool* ancestors = p.ancestor_mask + (int64_t(b) * width + i) * width;
  // Never past the buffer: a bound smaller than the rows would be the caller's bug, not a memory error.
  const int64_t end = min(row_start + row_len, p.mask_size);
  for (int64_t k = row_start + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t column = k - row_start;
    p.mask[k] = column < seq_len ? true : ancestors[column - seq_len];
  }
}

}  // namespace

cudaError_t launch_verify_inputs(const VerifyInputsParams& params, cudaStream_t stream) {
  if (params.width == 0 || (params.bs == 0 && params.mask_size == 0)) return cudaSuccess;
  verify_inputs_kernel<<<dim3(params.bs + 1, params.width), kMaskThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dflash

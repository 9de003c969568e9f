// Commit of an accepted tree path, without moving KV: the verify pass wrote node i's KV to the slot at
// req_to_token[r, seq_len + i]; committing rewrites positions seq_len + i (i <= accept_len) to the slot of path
// node i and reports every other verify slot as freed. Then the accepted rows' hidden features are gathered as the
// next draft context.
#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kCommitThreads = 128;
constexpr int kGatherThreads = 128;

__global__ void __launch_bounds__(kCommitThreads) commit_kernel(const __grid_constant__ CommitParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x;
  const int n = p.num_nodes;
  const int width = p.max_depth + 1;
  int32_t* slot = reinterpret_cast<int32_t*>(smem_raw);  // [n] verify slot of node i
  int32_t* path = slot + n;                                // [width]
  const int accepted = p.accept_len[b];
  const int64_t seq_len = p.seq_lens[b];
  int32_t* row = p.req_to_token + p.req_pool_indices[b] * p.row_stride + seq_len;

  for (int i = threadIdx.x; i < n; i += blockDim.x) slot[i] = row[i];
  for (int i = threadIdx.x; i <= accepted; i += blockDim.x) path[i] = p.path[int64_t(b) * width + i];
  // Path node i sits at index >= i, so every read of the row must land before any write to it.
  __syncthreads();

  for (int i = threadIdx.x; i <= accepted; i += blockDim.x) row[i] = slot[path[i]];
  // Rejected node j goes to freed position j - (path nodes before j); the path is increasing and starts at 0.
  int32_t* freed = p.freed_slots + int64_t(b) * (n - 1);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    int before = 0;
    bool on_path = false;
    for (int i = 0; i <= accepted; ++i) {
      before += path[i] < j;
      on_path |= path[i] == j;
    }
    if (!on_path) freed[j - before] = slot[j];
  }
  for (int k = n - 1 - accepted + threadIdx.x; k < n - 1; k += blockDim.x) freed[k] = -1;
  if (threadIdx.x == 0) p.new_seq_lens[b] = seq_len + accepted + 1;
}

// One CTA per (request, path position) copies one hidden row, or zeroes it past the accepted length.
template <typename Vec>
__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(const __grid_constant__ GatherRowsParams p) {
  const int b = blockIdx.x;
  const int i = blockIdx.y;
  const int width = p.max_depth + 1;
  const int64_t num_vecs = p.row_bytes / int64_t(sizeof(Vec));
  Vec* dst = reinterpret_cast<Vec*>(p.out + (int64_t(b) * width + i) * p.row_bytes);
  if (i > p.accept_len[b]) {
    for (int64_t k = threadIdx.x; k < num_vecs; k += blockDim.x) dst[k] = Vec{};
    return;
  }
  const int64_t src_row = int64_t(b) * p.num_nodes + p.path[int64_t(b) * width + i];
  const Vec* src = reinterpret_cast<const Vec*>(p.hidden + src_row * p.hidden_row_stride_bytes);
  for (int64_t k = threadIdx.x; k < num_vecs; k += blockDim.x) dst[k] = src[k];
}

bool aligned_to(int64_t value, int64_t bytes) { return value % bytes == 0; }

}  // namespace

cudaError_t launch_commit(const CommitParams& params, cudaStream_t stream) {
  if (params.bs == 0) return cudaSuccess;
  const size_t smem = size_t(params.num_nodes + params.max_depth + 1) * sizeof(int32_t);
  commit_kernel<<<params.bs, kCommitThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_gather_rows(const GatherRowsParams& params, cudaStream_t stream) {
  if (params.bs == 0 || params.row_bytes == 0) return cudaSuccess;
  const dim3 grid(params.bs, params.max_depth + 1);
  // Widest copy unit that divides the row, the source stride and both base addresses.
  const int64_t alignment = params.row_bytes | params.hidden_row_stride_bytes |
                            int64_t(reinterpret_cast<uintptr_t>(params.hidden)) |
                            int64_t(reinterpret_cast<uintptr_t>(params.out));
  if (aligned_to(alignment, 16)) {
    gather_rows_kernel<uint4><<<grid, kGatherThreads, 0, stream>>>(params);
  } else if (aligned_to(alignment, 8)) {
    gather_rows_kernel<uint2><<<grid, kGatherThreads, 0, stream>>>(params);
  } else if (aligned_to(alignment, 4)) {
    gather_rows_kernel<uint32_t><<<grid, kGatherThreads, 0, stream>>>(params);
  } else if (aligned_to(alignment, 2)) {
    gather_rows_kernel<uint16_t><<<grid, kGatherThreads, 0, stream>>>(params);
  } else {
    gather_rows_kernel<uint8_t><<<grid, kGatherThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace dflash

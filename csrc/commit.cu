// Commit of an accepted tree path, without moving KV, and the step's outputs. The verify pass wrote node j's KV to
// the slot at req_to_token[r, seq_len + j]; the commit permutes those W reserved columns so that the accepted path
// comes first (path node i at seq_len + i, its KV computed at exactly that position), then the other nodes in node
// order. A permutation of slots SGLang already reserved: nothing is copied, freed or leaked, and the rejected
// nodes' slots stay reserved past the new length for the next step to overwrite. The drafter's context K/V, which
// the verify wrote at every node's slot, moves with the slots.
#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kCommitThreads = 128;

__global__ void __launch_bounds__(kCommitThreads) commit_tree_kernel(const __grid_constant__ CommitTreeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x;
  const int n = p.num_nodes;
  const int width = p.max_depth + 1;
  int32_t* slot = reinterpret_cast<int32_t*>(smem_raw);  // [n] verify slot of node j
  int32_t* path = slot + n;                                // [width]
  const int accepted = p.accept_len[b];
  const int64_t seq_len = p.seq_lens[b];
  int32_t* row = p.req_to_token + p.req_pool_indices[b] * p.row_stride + seq_len;

  for (int j = threadIdx.x; j < n; j += blockDim.x) slot[j] = row[j];
  for (int i = threadIdx.x; i <= accepted; i += blockDim.x) path[i] = p.path[int64_t(b) * width + i];
  // Every read of the row lands before any write to it.
  __syncthreads();

  for (int i = threadIdx.x; i <= accepted; i += blockDim.x) row[i] = slot[path[i]];
  // The path is increasing and starts at 0 (parents come before children), so rejected node j goes to column
  // accepted + 1 + (rejected nodes before j) = accepted + 1 + j - (path nodes before j).
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    int before = 0;
    bool on_path = false;
    for (int i = 0; i <= accepted; ++i) {
      before += path[i] < j;
      on_path |= path[i] == j;
    }
    if (!on_path) row[accepted + 1 + j - before] = slot[j];
  }
  const int64_t out = int64_t(b) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const int64_t token = p.verified_emitted[out + i];
    p.emitted[out + i] = token >= 0 ? token : 0;
  }
  if (threadIdx.x == 0) {
    p.commit_lens[b] = accepted + 1;
    p.new_seq_lens[b] = seq_len + accepted + 1;
  }
}

}  // namespace

cudaError_t launch_commit_tree(const CommitTreeParams& params, cudaStream_t stream) {
  if (params.bs == 0) return cudaSuccess;
  const size_t smem = size_t(params.num_nodes + params.max_depth + 1) * sizeof(int32_t);
  commit_tree_kernel<<<params.bs, kCommitThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dflash

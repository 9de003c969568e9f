// The chain step's small bookkeeping, one launch each instead of a dozen torch ops: the block before the drafter
// (anchor + mask ids, positions, KV slots from the request's slot row) and, after the verify, greedy acceptance
// with everything the commit needs (accept length, bonus, new lengths, SGLang's emitted-token layout). One thread
// per request and position, or per request.
#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kChainThreads = 128;

__global__ void __launch_bounds__(kChainThreads) chain_block_kernel(const __grid_constant__ ChainBlockParams p) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= int64_t(p.bs) * p.block_size) return;
  const int b = int(index / p.block_size);
  const int j = int(index % p.block_size);
  const int64_t position = p.seq_lens[b] + j;
  p.block_ids[index] = j == 0 ? p.bonus[b] : p.mask_token_id;
  p.positions[index] = position;
  p.slots[index] = p.req_to_token[p.req_pool_indices[b] * p.row_stride + position];
}

__global__ void __launch_bounds__(kChainThreads) chain_accept_kernel(const __grid_constant__ ChainAcceptParams p) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= p.bs) return;
  const int block = p.block_size;
  const int64_t* candidates = p.candidates + int64_t(b) * block;
  const int64_t* predicted = p.predicted + int64_t(b) * block;
  // Draft j (candidates[j], j >= 1) is kept while it equals the target's argmax after the tokens before it.
  int accepted = 0;
  while (accepted + 1 < block && candidates[accepted + 1] == predicted[accepted]) ++accepted;
  const int64_t bonus = predicted[accepted];
  p.accept_len[b] = accepted;
  p.commit_lens[b] = accepted + 1;
  p.bonus[b] = bonus;
  p.new_seq_lens[b] = p.seq_lens[b] + accepted + 1;
  int64_t* emitted = p.emitted + int64_t(b) * block;
  for (int j = 0; j < block; ++j) emitted[j] = j < accepted ? candidates[j + 1] : (j == accepted ? bonus : 0);
}

}  // namespace

cudaError_t launch_chain_block(const ChainBlockParams& params, cudaStream_t stream) {
  const int64_t threads = int64_t(params.bs) * params.block_size;
  if (threads == 0) return cudaSuccess;
  const int64_t blocks = (threads + kChainThreads - 1) / kChainThreads;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  chain_block_kernel<<<unsigned(blocks), kChainThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_chain_accept(const ChainAcceptParams& params, cudaStream_t stream) {
  if (params.bs == 0) return cudaSuccess;
  chain_accept_kernel<<<(params.bs + kChainThreads - 1) / kChainThreads, kChainThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dflash

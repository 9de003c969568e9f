// Tree verification: walk from the root through the first_child / next_sibling lists and emit the accepted path,
// its length, the bonus token and the flat emitted-token row.
//
// Greedy: one CTA per request stages the tree in shared memory, thread 0 walks it (accept the first child whose
// token equals the target argmax at the current node).
//
// Sampling (multi-candidate speculative sampling of deterministic candidates): try the children of the current
// node in order; child c (token t) is accepted iff p(t) > 0 and coins[c] * mass < p(t), where mass is 1 minus the
// probability of the siblings already rejected at this node (rows are normalized, so this is the residual's mass
// without a vocabulary-wide sum, and the same float operations in the reference give the same decisions). If no
// child is accepted the bonus is drawn from the residual, p with the rejected tokens removed, by an exponential
// race: argmax over v of p(v) / race(v), which samples v with probability proportional to p(v) and is independent
// of summation order, so the race can be split over CTAs and still match the reference exactly. Each CTA of the
// grid (bs, chunks) redoes the cheap walk from shared memory, races its slice of the vocabulary and max-reduces a
// packed key (residual-positive flag, score bits, inverted index: the lowest index wins ties) into a per-request
// workspace word; the last CTA to arrive writes the outputs.
#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kGreedyThreads = 128;
constexpr int kSamplingThreads = 256;

__device__ __forceinline__ bool is_child(int c, int n) { return c > 0 && c < n; }

// Tree arrays of one request, staged in shared memory.
struct TreeSmem {
  int64_t* token;
  int32_t* first_child;
  int32_t* next_sibling;
  int32_t* path;  // [max_depth + 1]

  __device__ void load(const int64_t* tokens, const int32_t* first_child_in, const int32_t* next_sibling_in, int b,
                       int n) {
    const int64_t base = int64_t(b) * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      token[i] = tokens[base + i];
      first_child[i] = first_child_in[base + i];
      next_sibling[i] = next_sibling_in[base + i];
    }
  }
};

__device__ void write_verify_outputs(const TreeSmem& tree, int len, int64_t bonus_token, int b, int max_depth,
                                     int32_t* path, int32_t* accept_len, int64_t* bonus, int64_t* emitted) {
  const int width = max_depth + 1;
  const int64_t base = int64_t(b) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    path[base + i] = i <= len ? tree.path[i] : -1;
    emitted[base + i] = i < len ? tree.token[tree.path[i + 1]] : (i == len ? bonus_token : -1);
  }
  if (threadIdx.x == 0) {
    accept_len[b] = len;
    bonus[b] = bonus_token;
  }
}

__global__ void __launch_bounds__(kGreedyThreads) verify_greedy_kernel(const __grid_constant__ VerifyGreedyParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int len_s;
  __shared__ int64_t bonus_s;
  const int b = blockIdx.x;
  const int n = p.num_nodes;
  TreeSmem tree;
  tree.token = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* predict = tree.token + n;
  tree.first_child = reinterpret_cast<int32_t*>(predict + n);
  tree.next_sibling = tree.first_child + n;
  tree.path = tree.next_sibling + n;

  tree.load(p.tokens, p.first_child, p.next_sibling, b, n);
  for (int i = threadIdx.x; i < n; i += blockDim.x) predict[i] = p.target_predict[int64_t(b) * n + i];
  __syncthreads();

  if (threadIdx.x == 0) {
    int node = 0, len = 0, steps = 0;
    tree.path[0] = 0;
    // Every child is examined at most once in a tree, so n bounds the walk even on malformed links.
    while (len < p.max_depth) {
      const int64_t want = predict[node];
      int next = -1;
      for (int c = tree.first_child[node]; is_child(c, n) && steps < n; c = tree.next_sibling[c], ++steps) {
        if (tree.token[c] == want) {
          next = c;
          break;
        }
      }
      if (next < 0) break;
      tree.path[++len] = next;
      node = next;
    }
    len_s = len;
    bonus_s = predict[node];
  }
  __syncthreads();
  write_verify_outputs(tree, len_s, bonus_s, b, p.max_depth, p.path, p.accept_len, p.bonus, p.emitted);
}

// Race key: bit 63 = token keeps residual mass, bits 32..62 = bits of p / race (non-negative, so ordered as
// integers), bits 0..31 = ~index. The max key is the residual race winner, or the race over p itself when the
// residual lost all its mass to float rounding.
__device__ __forceinline__ unsigned long long race_key(float prob, float race, int64_t v, bool kept) {
  const uint32_t low = 0xFFFFFFFFu - uint32_t(v);
  if (!(prob > 0.f)) return low;
  const float score = __fdiv_rn(prob, race);
  return (uint64_t(kept) << 63) | (uint64_t(__float_as_uint(score)) << 32) | low;
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_down_sync(0xFFFFFFFFu, x, offset);
    x = other > x ? other : x;
  }
  return x;
}

template <bool kVec4>
__global__ void __launch_bounds__(kSamplingThreads)
    verify_sampling_kernel(const __grid_constant__ VerifySamplingParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int len_s, final_s, num_rejected_s;
  __shared__ bool is_last_s;
  __shared__ int64_t bonus_s;
  __shared__ unsigned long long warp_best[kSamplingThreads / 32];
  const int b = blockIdx.x;
  const int n = p.num_nodes;
  const int64_t V = p.vocab;
  TreeSmem tree;
  tree.token = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* rejected = tree.token + n;  // tokens rejected at the current node, in trial order
  float* child_prob = reinterpret_cast<float*>(rejected + n);
  float* coin = child_prob + n;
  tree.first_child = reinterpret_cast<int32_t*>(coin + n);
  tree.next_sibling = tree.first_child + n;
  int32_t* parent = tree.next_sibling + n;
  tree.path = parent + n;

  tree.load(p.tokens, p.first_child, p.next_sibling, b, n);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    coin[i] = p.coins[int64_t(b) * n + i];
    parent[i] = -1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    int steps = 0;
    for (int c = tree.first_child[i]; is_child(c, n) && steps < n; c = tree.next_sibling[c], ++steps) parent[c] = i;
  }
  __syncthreads();
  // Prefetch p(token of c | parent of c) for every node so the sequential walk never waits on global memory.
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    const int64_t t = tree.token[c];
    const int par = parent[c];
    child_prob[c] = (par >= 0 && t >= 0 && t < V) ? p.target_probs[(int64_t(b) * n + par) * V + t] : 0.f;
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    int node = 0, len = 0, steps = 0, num_rejected = 0;
    float mass = 1.f;
    tree.path[0] = 0;
    int c = p.max_depth > 0 ? tree.first_child[0] : -1;
    while (is_child(c, n) && steps++ < n) {
      const int64_t t = tree.token[c];
      float prob = child_prob[c];
      for (int k = 0; k < num_rejected; ++k) {
        if (rejected[k] == t) prob = 0.f;  // a repeated sibling token has no residual mass left
      }
      if (prob > 0.f && __fmul_rn(coin[c], mass) < prob) {
        tree.path[++len] = c;
        node = c;
        mass = 1.f;
        num_rejected = 0;
        c = len < p.max_depth ? tree.first_child[c] : -1;
      } else {
        mass = __fsub_rn(mass, prob);
        rejected[num_rejected++] = t;
        c = tree.next_sibling[c];
      }
    }
    len_s = len;
    final_s = node;
    num_rejected_s = num_rejected;
  }
  __syncthreads();

  const int num_rejected = num_rejected_s;
  const float* prob_row = p.target_probs + (int64_t(b) * n + final_s) * V;
  const float* race_row = p.race + int64_t(b) * V;
  const int64_t begin = int64_t(blockIdx.y) * p.chunk;
  const int64_t end = begin + p.chunk < V ? begin + p.chunk : V;
  auto key_of = [&](int64_t v, float prob, float race) {
    bool kept = true;
    if (prob > 0.f) {
      for (int k = 0; k < num_rejected; ++k) kept &= rejected[k] != v;
    }
    return race_key(prob, race, v, kept);
  };
  unsigned long long best = 0;
  if constexpr (kVec4) {
    for (int64_t v = begin + 4 * threadIdx.x; v < end; v += 4 * blockDim.x) {
      const float4 pr = *reinterpret_cast<const float4*>(prob_row + v);
      const float4 ra = *reinterpret_cast<const float4*>(race_row + v);
      const unsigned long long k0 = key_of(v, pr.x, ra.x), k1 = key_of(v + 1, pr.y, ra.y);
      const unsigned long long k2 = key_of(v + 2, pr.z, ra.z), k3 = key_of(v + 3, pr.w, ra.w);
      const unsigned long long k01 = k0 > k1 ? k0 : k1, k23 = k2 > k3 ? k2 : k3;
      const unsigned long long k = k01 > k23 ? k01 : k23;
      best = k > best ? k : best;
    }
  } else {
    for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
      const unsigned long long k = key_of(v, prob_row[v], race_row[v]);
      best = k > best ? k : best;
    }
  }
  best = warp_max(best);
  if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kSamplingThreads / 32; ++w) best = warp_best[w] > best ? warp_best[w] : best;
    atomicMax(p.best_keys + b, best);
    __threadfence();  // publish the max before counting this CTA as arrived
    is_last_s = atomicAdd(p.arrivals + b, 1u) == unsigned(p.num_chunks - 1);
  }
  __syncthreads();
  if (!is_last_s) return;
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long key = atomicAdd(p.best_keys + b, 0ull);
    bonus_s = int64_t(0xFFFFFFFFu - uint32_t(key & 0xFFFFFFFFull));
  }
  __syncthreads();
  write_verify_outputs(tree, len_s, bonus_s, b, p.max_depth, p.path, p.accept_len, p.bonus, p.emitted);
}

}  // namespace

cudaError_t launch_verify_greedy(const VerifyGreedyParams& params, cudaStream_t stream) {
  if (params.bs == 0) return cudaSuccess;
  const int n = params.num_nodes;
  const size_t smem = size_t(n) * (2 * sizeof(int64_t) + 2 * sizeof(int32_t)) + size_t(params.max_depth + 1) * 4;
  verify_greedy_kernel<<<params.bs, kGreedyThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_verify_sampling(const VerifySamplingParams& params, cudaStream_t stream) {
  if (params.bs == 0) return cudaSuccess;
  const int n = params.num_nodes;
  const size_t smem = size_t(n) * (2 * sizeof(int64_t) + 2 * sizeof(float) + 3 * sizeof(int32_t)) +
                      size_t(params.max_depth + 1) * sizeof(int32_t);
  // Requests on x (up to 2^31 - 1), vocabulary chunks on y (a few dozen at most).
  const dim3 grid(params.bs, params.num_chunks);
  // float4 loads need every row start 16-byte aligned: V % 4 == 0 (bases are checked by the binding).
  if (params.vocab % 4 == 0) {
    verify_sampling_kernel<true><<<grid, kSamplingThreads, smem, stream>>>(params);
  } else {
    verify_sampling_kernel<false><<<grid, kSamplingThreads, smem, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace dflash

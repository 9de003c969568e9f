// DDTree build: best-first expansion over per-depth top-k ranks, one CTA per request.
//
// The reference (dflash_sglang/tree.py: build_tree) pushes tuples (-score, order, depth, rank, parent) on a Python
// heapq and numbers nodes in pop order. Its tie-breaking is the insertion order, and when log-probs are -inf
// (filtered sampling distributions) scores become NaN, whose order is whatever heapq's sift sequence yields. To
// match it bit for bit in every case, thread 0 replays CPython's heapq algorithm (same sift paths, same
// comparisons, same double arithmetic) on a binary heap in shared memory. With a heap of at most budget + 1
// entries this is ~log2(budget) shared-memory steps per pop; everything else (tokens, links, positions, the
// ancestor mask) is written by the whole CTA afterwards.
#include "dflash_kernels.h"

namespace dflash {
namespace {

constexpr int kBuildThreads = 128;

// Heap entry metadata. The insertion order sits in the high word so that comparing metas compares orders.
__device__ __forceinline__ uint64_t pack_meta(uint32_t order, uint32_t parent, uint32_t depth, uint32_t rank) {
  return (uint64_t(order) << 32) | (uint64_t(parent) << 20) | (uint64_t(depth) << 10) | uint64_t(rank);
}
__device__ __forceinline__ int meta_parent(uint64_t m) { return int((m >> 20) & 0xFFF); }
__device__ __forceinline__ int meta_depth(uint64_t m) { return int((m >> 10) & 0x3FF); }
__device__ __forceinline__ int meta_rank(uint64_t m) { return int(m & 0x3FF); }

// Python orders the tuples by their first unequal field with float semantics: a NaN score equals nothing and is
// less than nothing. Orders are unique, so the remaining fields never decide.
__device__ __forceinline__ bool heap_less(double sa, uint64_t ma, double sb, uint64_t mb) {
  return sa == sb ? ma < mb : sa < sb;
}

// heapq._siftdown(heap, 0, pos) with the new item held in registers.
__device__ void sift_toward_root(double* score, uint64_t* meta, int pos, double s, uint64_t m) {
  while (pos > 0) {
    const int up = (pos - 1) >> 1;
    if (!heap_less(s, m, score[up], meta[up])) break;
    score[pos] = score[up];
    meta[pos] = meta[up];
    pos = up;
  }
  score[pos] = s;
  meta[pos] = m;
}

__device__ void heap_push(double* score, uint64_t* meta, int& size, double s, uint64_t m) {
  sift_toward_root(score, meta, size++, s, m);
}

// heapq.heappop: move the last item to the root, then _siftup (smaller child up until a leaf, the right child
// unless left < right), then _siftdown from that leaf.
__device__ void heap_pop(double* score, uint64_t* meta, int& size, double& top_score, uint64_t& top_meta) {
  --size;
  const double last_score = score[size];
  const uint64_t last_meta = meta[size];
  if (size == 0) {
    top_score = last_score;
    top_meta = last_meta;
    return;
  }
  top_score = score[0];
  top_meta = meta[0];
  int pos = 0;
  int child = 1;
  while (child < size) {
    const int right = child + 1;
    if (right < size && !heap_less(score[child], meta[child], score[right], meta[right])) child = right;
    score[pos] = score[child];
    meta[pos] = meta[child];
    pos = child;
    child = 2 * pos + 1;
  }
  sift_toward_root(score, meta, pos, last_score, last_meta);
}

struct BuildTreeSmem {
  double* heap_score;  // [n]
  uint64_t* heap_meta;  // [n]
  float* logprob;       // [depth * topk]
  int32_t* parent;      // [n]
  int32_t* depth;       // [n]
  int32_t* rank;        // [n]
  uint32_t* ancestors;  // [n * words]

  __device__ BuildTreeSmem(unsigned char* base, int n, int table) {
    heap_score = reinterpret_cast<double*>(base);
    heap_meta = reinterpret_cast<uint64_t*>(heap_score + n);
    logprob = reinterpret_cast<float*>(heap_meta + n);
    parent = reinterpret_cast<int32_t*>(logprob + table);
    depth = parent + n;
    rank = depth + n;
    ancestors = reinterpret_cast<uint32_t*>(rank + n);
  }
};

__global__ void __launch_bounds__(kBuildThreads) build_tree_kernel(const __grid_constant__ BuildTreeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x;
  const int n = p.budget + 1;
  const int table = p.depth * p.topk;
  const int words = (n + 31) / 32;
  BuildTreeSmem s(smem_raw, n, table);

  const float* logprob_in = p.topk_logprobs + int64_t(b) * table;
  for (int i = threadIdx.x; i < table; i += blockDim.x) s.logprob[i] = logprob_in[i];
  __syncthreads();

  if (threadIdx.x == 0) {
    s.parent[0] = -1;
    s.depth[0] = 0;
    s.rank[0] = 0;
    int size = 0;
    uint32_t order = 0;
    heap_push(s.heap_score, s.heap_meta, size, -double(s.logprob[0]), pack_meta(order++, 0, 1, 0));
    for (int node = 1; node < n; ++node) {
      double neg_score;
      uint64_t meta;
      heap_pop(s.heap_score, s.heap_meta, size, neg_score, meta);
      const int d = meta_depth(meta), r = meta_rank(meta), parent = meta_parent(meta);
      s.parent[node] = parent;
      s.depth[node] = d;
      s.rank[node] = r;
      if (node == n - 1) break;  // the reference's last pushes are never popped
      const float* row = s.logprob + (d - 1) * p.topk;
      // Same double operations in the same order as the reference: (neg + v[r]) - v[r+1], and neg - v'[0].
      if (r + 1 < p.topk) {
        const double sibling = __dsub_rn(__dadd_rn(neg_score, double(row[r])), double(row[r + 1]));
        heap_push(s.heap_score, s.heap_meta, size, sibling, pack_meta(order++, parent, d, r + 1));
      }
      if (d < p.depth) {
        const double child = __dsub_rn(neg_score, double(row[p.topk]));
        heap_push(s.heap_score, s.heap_meta, size, child, pack_meta(order++, node, d + 1, 0));
      }
    }
  }
  __syncthreads();

  const int64_t base = int64_t(b) * n;
  const int64_t start = p.start_positions[b];
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int d = s.depth[i];
    const int parent = s.parent[i];
    p.tokens[base + i] = i == 0 ? p.root_tokens[b] : p.topk_ids[int64_t(b) * table + (d - 1) * p.topk + s.rank[i]];
    p.parents[base + i] = parent;
    p.depths[base + i] = d;
    p.positions[base + i] = start + d;
    // Nodes are numbered in pop order and a sibling is pushed only when its predecessor pops, so children appear in
    // rank order at increasing indices: the first child and the next sibling are the first later matches.
    int first_child = -1, next_sibling = -1;
    for (int c = i + 1; c < n; ++c) {
      const int pc = s.parent[c];
      if (first_child < 0 && pc == i) first_child = c;
      if (next_sibling < 0 && i > 0 && pc == parent) next_sibling = c;
    }
    p.first_child[base + i] = first_child;
    p.next_sibling[base + i] = next_sibling;
    uint32_t* bits = s.ancestors + i * words;
    for (int w = 0; w < words; ++w) bits[w] = 0;
    for (int a = i; a >= 0; a = s.parent[a]) bits[a >> 5] |= 1u << (a & 31);
  }
  __syncthreads();

  bool* mask = p.ancestor_mask + base * n;
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, j = idx - i * n;
    mask[idx] = (s.ancestors[i * words + (j >> 5)] >> (j & 31)) & 1u;
  }
}

}  // namespace

size_t build_tree_smem_bytes(int depth, int topk, int budget) {
  const size_t n = size_t(budget) + 1;
  const size_t words = (n + 31) / 32;
  return n * (sizeof(double) + sizeof(uint64_t)) + size_t(depth) * topk * sizeof(float) + 3 * n * sizeof(int32_t) +
         n * words * sizeof(uint32_t);
}

cudaError_t launch_build_tree(const BuildTreeParams& params, cudaStream_t stream) {
  if (params.bs == 0) return cudaSuccess;
  const size_t smem = build_tree_smem_bytes(params.depth, params.topk, params.budget);
  build_tree_kernel<<<params.bs, kBuildThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace dflash

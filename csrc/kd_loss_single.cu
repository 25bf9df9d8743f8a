// Single-read fused top-k KD loss for one vocab shard (no TP group, or TP size 1), sm_90+.
//
// The two-pass kernels of kd_loss_kernel.cu read the logits twice because with TP > 1 the row's
// log-normaliser needs a cross-rank all-reduce between the statistics and the gradient. With a
// single shard the row is complete on one GPU, so one thread-block CLUSTER per row does both:
//
//   1. Stage. CTA r of the cluster (C CTAs, C a power of two) copies its contiguous slice of the
//      row into its shared memory: 16-byte cp.async copies for the aligned body, scalar loads for
//      the unaligned head (rank 0) and tail (rank C - 1). This is the row's only HBM read.
//   2. Local statistics from shared memory: exactly pass 1's online (max, sum-exp) at tau over the
//      slice's real columns, the sum over the columns outside the teacher's top-k K (a K bitmap of
//      the slice), and the temperature-1 sum-exp when the CE is on. The block reduces them
//      (kd_loss_device.cuh: block_online) and thread 0 publishes (m, zk, mt, t, z1) in `part`.
//   3. Cluster reduction through distributed shared memory (DSMEM):
//        cluster_sync #1  - every CTA's slice and `part` are complete and visible cluster-wide
//                           (barrier.cluster arrive.release / wait.acquire by every thread), and
//                           every CTA of the cluster is known to be running, so its shared memory
//                           may be mapped.
//        gather           - threads q < C copy rank q's `part` (map_shared_rank) into the local
//                           `allp`; the student logits at K and the CE label are read from the
//                           owning CTA's staged slice (the owner follows from the slice geometry,
//                           which every CTA computes identically from the row's alignment).
//        arrive #2        - each thread signals that its remote reads are done (release).
//        merge            - every thread of every CTA merges allp[0..C-1] in rank order: the same
//                           bits everywhere, no atomics, so the result is deterministic and all
//                           CTAs agree on the global (m2, mt2, Z, T, Z1) without further exchange.
//        wait #2          - at the very end: no CTA exits (its shared memory is released) while
//                           another CTA of the cluster may still be reading it.
//      All CTAs of a cluster belong to the same row, so they take the same branches: either all
//      reach both cluster barriers, or (masked row) none touches DSMEM or a cluster barrier.
//   4. Per-row terms: each CTA evaluates pass 2's steps 1-5 (row_terms, grad_coefs: k <= 1024
//      outcomes, negligible next to the slice) redundantly from the same inputs; rank 0 writes
//      the loss terms.
//   5. Gradient of the slice from shared memory with 16-byte stores (the row's only HBM write):
//      the dense part, a block barrier, then the columns of K in the slice overwritten, as in
//      pass 2. Padding columns (>= real) get 0; masked rows write zeros without reading.
//
// Cluster size (host, kd_single_plan): the smallest power of two C <= 16 whose per-CTA slice
// buffer + K bitmap + per-row arrays fit kKDSingleSmemBudget (100 KiB: two CTAs per SM on an H100,
// so one CTA's loads overlap another's stores; three when the slice is <= ~70 KiB, e.g. bf16 x
// 128256 columns -> C = 4, 67.5 KiB). Sizes above 8 opt in to non-portable cluster sizes, and the
// plan asks cudaOccupancyMaxActiveClusters that such a cluster can be scheduled at all. Rows that
// do not fit fall back to the two-pass kernels (the Python dispatcher asks kd_single_supported).
//
// Slice geometry of one row (n = vl columns, V elements per 16-byte vector): head = columns before
// the first 16-byte boundary of the row, nvec full vectors, then a tail < V. Vectors are dealt
// in contiguous runs of vpr = ceil(nvec / C) to the ranks; rank 0 also takes the head and rank
// C - 1 the tail. xs[i] of CTA r holds column body0_r - V + i, so the body starts at xs[V]
// (16-byte aligned) and rank 0's head sits just below it in xs[V - head .. V).

#include "kd_loss.h"
#include "kd_loss_device.cuh"

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#if !defined(KD_HOST_EMULATION)
#include <cooperative_groups.h>
#endif

#if defined(KD_HOST_EMULATION)
#define KD_SINGLE_DEVICE_CODE 1  // the host test harness provides the cluster primitives
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KD_SINGLE_DEVICE_CODE 1
namespace kdtrain {
namespace kd {
__device__ __forceinline__ unsigned cluster_rank() { return cooperative_groups::this_cluster().block_rank(); }
__device__ __forceinline__ unsigned cluster_size() { return cooperative_groups::this_cluster().num_blocks(); }
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
__device__ __forceinline__ void cluster_arrive() { __cluster_barrier_arrive(); }  // .release
__device__ __forceinline__ void cluster_wait() { __cluster_barrier_wait(); }      // .acquire
template <typename P>
__device__ __forceinline__ P* cluster_map(P* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
}  // namespace kd
}  // namespace kdtrain
#else
#define KD_SINGLE_DEVICE_CODE 0
#endif

namespace kdtrain {
namespace {

using namespace kd;  // NOLINT: the helpers of kd_loss_device.cuh

// Floats after the slice buffer and the bitmap: lq[k], aux[k], red5[kOnlineFloats kWarps], red[kWarps],
// part[kOnlineFloats], allp[kOnlineFloats kKDSingleMaxCluster], misc[4].
constexpr int kSingleFixedFloats =
    (kOnlineFloats + 1) * kWarps + kOnlineFloats + kOnlineFloats * kKDSingleMaxCluster + 4;

#if KD_SINGLE_DEVICE_CODE  // (the sm_80 build has an empty kernel: no unused helpers)
// Contiguous columns [c0, c1) of one CTA; xs[i] <-> column body0 - V + i; nbody 16-byte vectors
// from column body0.
struct Slice {
  int64_t body0, nbody, c0, c1;
};

struct SliceGeom {
  int64_t head, nvec, vpr;
  int C, V;
  int64_t vl;

  __device__ __forceinline__ Slice of(int q) const {
    const int64_t vb = q * vpr < nvec ? q * vpr : nvec;
    const int64_t ve = (q + 1) * vpr < nvec ? (q + 1) * vpr : nvec;
    Slice s;
    s.body0 = head + vb * V;
    s.nbody = ve - vb;
    s.c0 = q == 0 ? 0 : s.body0;
    s.c1 = q == C - 1 ? vl : s.body0 + s.nbody * V;
    return s;
  }
  // Rank holding column `col` (0 <= col < vl).
  __device__ __forceinline__ int owner(int64_t col) const {
    if (col < head) return 0;
    const int64_t v = (col - head) / V;
    if (v >= nvec) return C - 1;  // the row's scalar tail
    const int64_t q = v / vpr;
    return q < C - 1 ? static_cast<int>(q) : C - 1;
  }
};

// Gradient stores of one slice: value(z, col) for every column in [c0, c1); kZero: 0 without
// reading the staged logits. 16-byte stores on the body when the gradient row has the logits
// row's misalignment (vec_ok), else scalar stores.
template <typename T, bool kZero>
__device__ __forceinline__ void write_slice(T* g, const T* xs, const Slice& s, bool vec_ok, const DenseCoef& dc) {
  constexpr int V = VecWidth<T>::value;
  const int64_t base = s.body0 - V;
  const int64_t bend = s.body0 + s.nbody * V;
  auto value = [&](float z, int64_t j) { return kZero ? 0.f : dense_value(dc, z, j); };
  for (int64_t j = s.c0 + threadIdx.x; j < s.body0; j += kThreads)  // head (rank 0)
    g[j] = from_f<T>(value(kZero ? 0.f : to_f(xs[j - base]), j));
  if (vec_ok) {
    const uint4* in = reinterpret_cast<const uint4*>(xs + V);
    uint4* out = reinterpret_cast<uint4*>(g + s.body0);
#pragma unroll 2
    for (int64_t v = threadIdx.x; v < s.nbody; v += kThreads) {
      if (kZero) {
        out[v] = make_uint4(0u, 0u, 0u, 0u);
      } else {
        float f[V];
        unpack<T>(in[v], f);
        const int64_t col = s.body0 + v * V;
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] = dense_value(dc, f[i], col + i);
        out[v] = pack<T>(f);
      }
    }
  } else {
    for (int64_t j = s.body0 + threadIdx.x; j < bend; j += kThreads)
      g[j] = from_f<T>(value(kZero ? 0.f : to_f(xs[j - base]), j));
  }
  for (int64_t j = bend + threadIdx.x; j < s.c1; j += kThreads)  // tail (rank C - 1)
    g[j] = from_f<T>(value(kZero ? 0.f : to_f(xs[j - base]), j));
}
#endif  // KD_SINGLE_DEVICE_CODE

template <typename T>
__global__ void __launch_bounds__(kThreads, 3)
    kd_single_kernel(const KDPass2Args a, const int slice_bytes, const int bitmap_words, const bool vec_ok) {
#if KD_SINGLE_DEVICE_CODE
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int V = VecWidth<T>::value;
  const int k = a.k;
  T* xs = reinterpret_cast<T*>(smem);
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem + slice_bytes);
  float* lq = reinterpret_cast<float*>(bitmap + bitmap_words);
  float* aux = lq + k;
  float* red5 = aux + k;
  float* red = red5 + kOnlineFloats * kWarps;
  float* part = red + kWarps;                   // this CTA's (m, zk, mt, t, z1), read by the cluster
  float* allp = part + kOnlineFloats;           // every rank's part, in rank order
  float* misc = allp + kOnlineFloats * kKDSingleMaxCluster;  // misc[0] = z_y

  const int C = static_cast<int>(cluster_size());
  const int rank = static_cast<int>(cluster_rank());
  const int64_t row = blockIdx.x / C;  // cluster dims (C, 1, 1): the C blocks of a row are consecutive
  const int64_t vl = a.vl, real = a.real;
  const T* x = static_cast<const T*>(a.logits) + row * vl;
  T* g = a.grad != nullptr ? static_cast<T*>(a.grad) + row * vl : nullptr;
  const int32_t* ids = a.ids + row * k;
  float* terms = a.terms + row * 2;
  const float wr = a.row_weight[row];

  const RowSplit sp = split_row(x, vl);
  SliceGeom geo;
  geo.head = sp.head;
  geo.nvec = sp.nvec;
  geo.vpr = (sp.nvec + C - 1) / C;
  if (geo.vpr < 1) geo.vpr = 1;
  geo.C = C;
  geo.V = V;
  geo.vl = vl;
  const Slice sl = geo.of(rank);
  const int64_t base = sl.body0 - V;  // xs[i] holds column base + i
  const DenseCoef no_coef{};

  if (wr == 0.f) {  // masked token (same for every CTA of the cluster): zeros, no DSMEM, no cluster barrier
    if (rank == 0 && threadIdx.x == 0) terms[0] = terms[1] = 0.f;
    if (g != nullptr) write_slice<T, true>(g, xs, sl, vec_ok, no_coef);
    return;
  }

  // 1. Stage the slice (the row's one HBM read) and clear the slice's K bitmap.
  {
    const uint4* src = reinterpret_cast<const uint4*>(x + sl.body0);  // x + head is 16-byte aligned
    uint4* dst = reinterpret_cast<uint4*>(xs + V);
    for (int64_t v = threadIdx.x; v < sl.nbody; v += kThreads) cp_async16(dst + v, src + v);
    for (int64_t j = sl.c0 + threadIdx.x; j < sl.body0; j += kThreads) xs[j - base] = x[j];
    for (int64_t j = sl.body0 + sl.nbody * V + threadIdx.x; j < sl.c1; j += kThreads) xs[j - base] = x[j];
    for (int w = threadIdx.x; w < bitmap_words; w += kThreads) bitmap[w] = 0u;
  }
  const int64_t e_real = sl.c1 < real ? sl.c1 : real;  // end of this slice's real columns
  __syncthreads();  // bitmap cleared
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
    if (local >= sl.c0 && local < e_real) {
      const int64_t b = local - base;
      atomicOr(&bitmap[b >> 5], 1u << (b & 31));  // OR: order-free
    }
  }
  cp_async_wait_all();
  __syncthreads();  // staged slice and bitmap complete

  // 2. Pass-1 statistics of the slice's real columns, from shared memory.
  const float tau = a.tau;
  const float c = kLog2e / tau;
  const bool ce = a.alpha > 0.f && a.labels != nullptr;
  const bool ce1 = ce && tau != 1.f;  // at tau == 1 the CE normaliser equals Z
  Online s{kNegInf, 0.f, kNegInf, 0.f, 0.f};
  const int64_t head_end = sl.body0 < e_real ? sl.body0 : e_real;
  for (int64_t j = sl.c0 + threadIdx.x; j < head_end; j += kThreads) {
    const float v = to_f(xs[j - base]) * c;
    online_add<1>(s, &v, k_bits(bitmap, j - base), tau, ce1);
  }
  int64_t vfull = 0;  // body vectors made only of real columns
  if (real > sl.body0) {
    vfull = (real - sl.body0) / V;
    if (vfull > sl.nbody) vfull = sl.nbody;
  }
  const uint4* body = reinterpret_cast<const uint4*>(xs + V);
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < vfull; v += kThreads) {
    float f[V];
    unpack<T>(body[v], f);
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] *= c;
    online_add<V>(s, f, k_bits(bitmap, V + v * V), tau, ce1);
  }
  for (int64_t j = sl.body0 + vfull * V + threadIdx.x; j < e_real; j += kThreads) {
    const float v = to_f(xs[j - base]) * c;
    online_add<1>(s, &v, k_bits(bitmap, j - base), tau, ce1);
  }
  const Online blk = block_online(s, tau, ce1, red5);
  if (threadIdx.x == 0) {
    part[0] = blk.m;
    part[1] = blk.zk;
    part[2] = blk.mt;
    part[3] = blk.t;
    part[4] = blk.z1;
  }

  // 3. Cluster reduction (see the header comment).
  cluster_sync();  // #1: slices and parts of all CTAs complete and visible
  if (threadIdx.x < C) {
    const float* rp = cluster_map(part, static_cast<unsigned>(threadIdx.x));
#pragma unroll
    for (int f = 0; f < kOnlineFloats; ++f) allp[kOnlineFloats * threadIdx.x + f] = rp[f];
  }
  for (int i = threadIdx.x; i < k; i += kThreads) {  // raw student logits at K, from the owner's slice
    const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
    float z = 0.f;
    if (local >= 0 && local < real) {
      const int q = geo.owner(local);
      const T* xq = cluster_map(xs, static_cast<unsigned>(q));
      z = to_f(xq[local - (geo.of(q).body0 - V)]);
    }
    lq[i] = z;  // row_terms reads zK[i] = lq[i] in the same thread before overwriting it
  }
  if (threadIdx.x == 0) {
    float zy = 0.f;
    if (ce) {
      const int64_t yl = a.labels[row] - a.start;
      if (yl >= 0 && yl < real) {
        const int q = geo.owner(yl);
        const T* xq = cluster_map(xs, static_cast<unsigned>(q));
        zy = to_f(xq[yl - (geo.of(q).body0 - V)]);
      }
    }
    misc[0] = zy;
  }
  cluster_arrive();  // #2 (arrive): this thread's remote reads are done
  __syncthreads();   // allp and misc visible to the whole block
  Online tot{allp[0], allp[1], allp[2], allp[3], allp[4]};
  for (int q = 1; q < C; ++q) {
    const float* p = allp + kOnlineFloats * q;
    online_merge(tot, Online{p[0], p[1], p[2], p[3], p[4]}, tau, ce1);
  }
  const float Z = online_total(tot);
  const RowStats rs{tot.m, tot.mt, Z, tot.t, misc[0], ce ? (ce1 ? tot.z1 : Z) : 0.f};

  // 4. Loss terms: pass 2's steps 1-4, identical in every CTA; rank 0 writes them.
  const RowTerms rt = row_terms(a, row, rs, lq, lq, aux, red);
  if (rank == 0 && threadIdx.x == 0) {
    terms[0] = a.kd_scale * rt.D;
    terms[1] = rt.ce;
  }

  // 5. Gradient of the slice (the row's one HBM write), then the columns of K in the slice.
  if (g != nullptr) {
    const DenseCoef dc = grad_coefs(a, row, rs, rt, wr, lq, aux);
    if (dense_is_zero(dc)) {
      write_slice<T, true>(g, xs, sl, vec_ok, dc);
    } else {
      write_slice<T, false>(g, xs, sl, vec_ok, dc);
    }
    __syncthreads();  // orders the dense stores before the overwrites below (same block)
    for (int i = threadIdx.x; i < k; i += kThreads) {
      const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
      if (local < sl.c0 || local >= e_real) continue;
      g[local] = from_f<T>(k_column_value(dc, aux[i], to_f(xs[local - base]), local));
    }
  }
  cluster_wait();  // #2 (wait): every CTA has finished reading this CTA's shared memory
#else
  __trap();  // built without sm_90 code: kd_single_plan reports the path unavailable, never launched
#endif
}

template <typename T>
const void* single_kernel_ptr() {
  return reinterpret_cast<const void*>(&kd_single_kernel<T>);
}

const void* single_kernel_for(KDDtype dtype) {
  switch (dtype) {
    case KDDtype::kFloat32: return single_kernel_ptr<float>();
    case KDDtype::kFloat16: return single_kernel_ptr<__half>();
    case KDDtype::kBFloat16: return single_kernel_ptr<__nv_bfloat16>();
  }
  return nullptr;
}

int elem_size(KDDtype dtype) { return dtype == KDDtype::kFloat32 ? 4 : 2; }

// Shared-memory layout of a C-CTA cluster for rows of vl columns.
void plan_layout(KDSinglePlan& p, int64_t vl, int k, int esize, int C) {
  const int64_t V = 16 / esize;
  const int64_t nv = vl / V;                 // >= the full vectors of any row of vl columns
  const int64_t vpr = (nv + C - 1) / C;      // >= the vectors a rank gets
  const int64_t slice = (vpr + 2) * 16;      // body + one vector each for the head and the tail
  const int64_t words = (vpr + 2) * V / 32 + 2;  // k_bits reads one word past the last column's
  const int64_t bytes = slice + 4 * words + 4 * (2 * static_cast<int64_t>(k) + kSingleFixedFloats);
  p.cluster = C;
  p.slice_bytes = slice > (1 << 30) ? (1 << 30) : static_cast<int>(slice);
  p.bitmap_words = words > (1 << 28) ? (1 << 28) : static_cast<int>(words);
  p.smem = bytes > (1 << 30) ? (1 << 30) : static_cast<int>(bytes);
}

cudaError_t configure(const void* kern, const KDSinglePlan& p) {
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem);
  if (e == cudaSuccess && p.cluster > 8)
    e = cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return e;
}

KDSinglePlan make_plan(KDDtype dtype, int64_t vl, int k, int device) {
  KDSinglePlan p{0, 0, 0, 0, nullptr};
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) {
    cudaGetLastError();
    p.why = "needs compute capability 9.0 or newer (thread-block clusters)";
    return p;
  }
  const void* kern = single_kernel_for(dtype);
  cudaFuncAttributes fa;
  if (kern == nullptr || cudaFuncGetAttributes(&fa, kern) != cudaSuccess || fa.ptxVersion < 90) {
    cudaGetLastError();
    p.why = "the kernels were built without sm_90 code";
    return p;
  }
  int budget = kd_max_dynamic_smem(device);
  if (budget > kKDSingleSmemBudget) budget = kKDSingleSmemBudget;
  KDSinglePlan c{0, 0, 0, 0, nullptr};
  for (int C = 1; C <= kKDSingleMaxCluster; C *= 2) {
    plan_layout(c, vl, k, elem_size(dtype), C);
    if (c.smem <= budget) break;
    c.cluster = 0;
  }
  if (c.cluster == 0) {
    p.why = "the row does not fit in the shared memory of a 16-CTA cluster";
    return p;
  }
  if (configure(kern, c) != cudaSuccess) {
    cudaGetLastError();
    p.why = "the cluster size or shared memory size was refused (cudaFuncSetAttribute)";
    return p;
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(c.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(c.cluster), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(c.smem);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg) != cudaSuccess || clusters < 1) {
    cudaGetLastError();
    p.why = "no cluster of this size and shared memory can be scheduled on this device";
    return p;
  }
  return c;
}

template <typename T>
cudaError_t single_typed(const KDPass2Args& a, const KDSinglePlan& p, cudaStream_t stream) {
  // Vector stores need the gradient row misaligned like the logits row (the slices follow the
  // logits' 16-byte grid).
  const bool vec_ok = a.grad == nullptr ||
                      (reinterpret_cast<uintptr_t>(a.logits) & 15u) == (reinterpret_cast<uintptr_t>(a.grad) & 15u);
  const cudaError_t e = configure(single_kernel_ptr<T>(), p);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(p.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(a.rows * p.cluster), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(p.smem);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kd_single_kernel<T>, a, p.slice_bytes, p.bitmap_words, vec_ok);
}

}  // namespace

KDSinglePlan kd_single_plan(KDDtype dtype, int64_t vl, int k, int device) {
  // Cached per (device, dtype, vl, k): the plan costs a few driver queries.
  static std::mutex mu;
  static std::map<std::tuple<int, int, int64_t, int>, KDSinglePlan> cache;
  const auto key = std::make_tuple(device, static_cast<int>(dtype), vl, k);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const KDSinglePlan p = make_plan(dtype, vl, k, device);
  cache.emplace(key, p);
  return p;
}

cudaError_t kd_single_launch(KDDtype dtype, const KDPass2Args& args, const KDSinglePlan& plan, cudaStream_t stream) {
  if (plan.cluster < 1 || plan.cluster > kKDSingleMaxCluster) return cudaErrorInvalidConfiguration;
  if (args.rows == 0) return cudaSuccess;
  if (args.rows * plan.cluster > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case KDDtype::kFloat32: return single_typed<float>(args, plan, stream);
    case KDDtype::kFloat16: return single_typed<__half>(args, plan, stream);
    case KDDtype::kBFloat16: return single_typed<__nv_bfloat16>(args, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kdtrain

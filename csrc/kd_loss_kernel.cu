// Fused top-k knowledge-distillation loss over a vocab-parallel shard of student logits.
//
// One CUDA block per row (token). Inputs bf16 / fp16 / fp32, fp32 arithmetic throughout,
// 16-byte vector loads/stores on the aligned body of each row with scalar head and tail, any
// local vocab size, k <= 1024. No atomics across blocks and fixed reduction trees inside a
// block, so results are bitwise reproducible run to run.
//
// ----------------------------------------------------------------------------------------------
// Notation (one row). z: student logits of the full vocabulary (this block sees one shard),
// s = z / tau, lse = log sum_j exp(s_j) over all real columns of all shards, q_j = exp(s_j - lse).
// K: the teacher's k distinct top ids; p_i the teacher probabilities at K: from its logits and
// the logsumexp of its logits outside K (the softmax over K and the tail as one more outcome), or
// its log-probs, or normalised over K when no tail was sent.
//
// Support of the divergence, n outcomes:
//   tail mode   : i in K plus, when k < V, the tail bucket t with P_t = exp(tail - lse_T) from the
//                 teacher's own tail sum (log-probs: max(0, 1 - sum_K p)),
//                 Q_t = exp(m_t - m) T / Z where T = sum_{j not in K} exp(s_j - m_t), Z = sum_j exp(s_j - m),
//                 m = max_j s_j, m_t = max_{j not in K} s_j: the tail sum has its own shift, so a
//                 tail far below the top-k (a collapsed student, a low tau) does not underflow.
//                 An empty bucket's log is floored at log_floor (its 0 * log 0 terms vanish).
//   renorm mode : i in K, P_i = p_i / sum_K p, Q_i = exp(s_{K_i}) / sum_K exp(s_K).
//
// Divergence D(P, Q) and w_i := dD/d(log Q_i) (P fixed):
//   forward KL  D = sum P (log P - log Q)                        w_i = -P_i
//   reverse KL  D = sum Q (log Q - log P)                        w_i = Q_i (log Q_i - log P_i) [+ Q_i]
//   JSD(beta)   M = beta P + (1 - beta) Q,
//               D = beta sum P log(P/M) + (1-beta) sum Q log(Q/M)
//               dD/dQ_i = -beta(1-beta) P_i / M_i + (1-beta)(log(Q_i/M_i) + 1 - (1-beta) Q_i / M_i)
//                       = (1-beta) [log(Q_i/M_i) + 1 - (beta P_i + (1-beta) Q_i) / M_i]
//                       = (1-beta) log(Q_i / M_i)            ->  w_i = (1-beta) Q_i log(Q_i / M_i)
// A term c * Q_i added to every w_i (the bracketed "+ Q_i" of reverse KL) never changes the
// gradient, because Q stays normalised: sum_i dQ_i = 0. So it is dropped.
//
// Chain rule to s (dlog Q_i / ds_j for the two parametrisations of Q):
//   tail mode, i in K : log Q_i = s_{K_i} - lse          -> d/ds_j = [j = K_i] - q_j
//              bucket : log Q_t = (m_t - m) + log T - log Z  -> d/ds_j = [j not in K] q_j / Q_t - q_j
//   so with W = sum_{all outcomes} w_i:
//     dD/ds_{K_i}       = w_i - Q_i W                                            (Q_i = q_{K_i})
//     dD/ds_j, j not K  = q_j (w_t / Q_t - W) = et_j (w_t - Q_t W) / T,  et_j = exp(s_j - m_t)
//   An empty student tail (T == 0, floored) is a constant: w_t = 0 and the coefficient is 0.
//   renorm mode : log Q_i = s_{K_i} - log sum_K exp(s_K) -> dD/ds_{K_i} = w_i - Q_i W, else 0.
//
// Per-row loss: loss = (1 - alpha) c D + alpha CE,  c = tau^2 (scale_by_tau_sq) or 1,
//   CE = logsumexp(z) - z_y (temperature 1), dCE/dz_j = softmax(z)_j - [j = y].
// Gradient written by pass 2 (row weight w_r = valid / num_tokens; for fp16 logits w_r = valid and
// 1 / num_tokens is applied by the backward scaling, so fp16 gradients do not underflow):
//   g_j = w_r [ (1-alpha) c / tau * dD/ds_j + alpha (exp(z_j - tau m) / Z1 - [j = y]) ]
// i.e. a dense part  A' et_j + B' e1_j  over all real columns (A' from the tail coefficient,
// B' = w_r alpha / Z1, e1_j = exp(z_j - tau m)), a -w_r alpha at the label, and at the ids of K
// the dense KD part replaced by (1-alpha) c / tau (w_i - Q_i W). Pass 2 writes the dense part
// with vector stores, synchronises the block, then overwrites the k columns of K (a column is
// written by one thread after the barrier, so the row is deterministic).
//
// Exponentials use base 2: s2_j = z_j * log2(e) / tau, m2 = max s2, mt2 = max over j not in K,
// et_j = 2^(s2_j - mt2).
// ----------------------------------------------------------------------------------------------

#include "kd_loss.h"
#include "kd_loss_device.cuh"

#include <cstdint>

namespace kdtrain {
namespace {

using namespace kd;  // NOLINT: the helpers of kd_loss_device.cuh

// ------------------------------------------------------------------------------------- pass 1

template <typename T>
__global__ void __launch_bounds__(kThreads) kd_pass1_kernel(const KDPass1Args a) {
  extern __shared__ uint32_t bitmap[];  // K membership of this shard's columns
  __shared__ float red5[kOnlineFloats * kWarps];
  constexpr int V = VecWidth<T>::value;
  const int64_t row = blockIdx.x;
  const int k = a.k;
  const int64_t real = a.real;
  const T* x = static_cast<const T*>(a.logits) + row * a.vl;
  const int32_t* ids = a.ids + row * k;
  float* st = a.stats + row * (4 + k);

  // Gathers: raw student logits at the ids of K in this shard, and the CE target logit.
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
    st[4 + i] = (local >= 0 && local < real) ? to_f(x[local]) : 0.f;
  }
  if (threadIdx.x == 0) {
    float zy = 0.f;
    if (a.ce && a.labels != nullptr) {
      const int64_t yl = a.labels[row] - a.start;
      if (yl >= 0 && yl < real) zy = to_f(x[yl]);
    }
    st[2] = zy;
  }
  if (!a.dense) {  // renorm without CE: only the gathers are needed
    if (threadIdx.x == 0) {
      a.m2[2 * row] = a.m2[2 * row + 1] = 0.f;
      st[0] = st[1] = st[3] = 0.f;
    }
    return;
  }

  const int64_t words = (real + 31) / 32 + 1;
  for (int64_t w = threadIdx.x; w < words; w += kThreads) bitmap[w] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
    if (local >= 0 && local < real) atomicOr(&bitmap[local >> 5], 1u << (local & 31));  // OR: order-free
  }
  __syncthreads();

  const float c = kLog2e / a.tau;
  const float tau = a.tau;
  const bool ce1 = a.ce && tau != 1.f;  // at tau == 1 the CE normaliser equals Z
  Online s{kNegInf, 0.f, kNegInf, 0.f, 0.f};
  const RowSplit sp = split_row(x, real);
  for (int64_t j = threadIdx.x; j < sp.head; j += kThreads) {
    const float v = to_f(x[j]) * c;
    online_add<1>(s, &v, k_bits(bitmap, j), tau, ce1);
  }
  const uint4* body = reinterpret_cast<const uint4*>(x + sp.head);
  for (int64_t v0 = threadIdx.x; v0 < sp.nvec; v0 += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (v < sp.nvec) raw[u] = __ldg(body + v);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (v < sp.nvec) {
        float f[V];
        unpack<T>(raw[u], f);
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] *= c;
        online_add<V>(s, f, k_bits(bitmap, sp.head + v * V), tau, ce1);
      }
    }
  }
  for (int64_t j = sp.head + sp.nvec * V + threadIdx.x; j < real; j += kThreads) {
    const float v = to_f(x[j]) * c;
    online_add<1>(s, &v, k_bits(bitmap, j), tau, ce1);
  }

  const Online r = block_online(s, tau, ce1, red5);
  if (threadIdx.x == 0) {
    const float Z = online_total(r);
    a.m2[2 * row] = r.m;
    a.m2[2 * row + 1] = r.mt;
    st[0] = Z;
    st[1] = r.t;
    st[3] = a.ce ? (ce1 ? r.z1 : Z) : 0.f;
  }
}

// ------------------------------------------------------------------------------------- pass 2

template <typename T>
__device__ __forceinline__ void zero_row(T* g, int64_t n, bool vec_ok) {
  constexpr int V = VecWidth<T>::value;
  const RowSplit sp = vec_ok ? split_row(g, n) : RowSplit{n, 0};
  const T zero = from_f<T>(0.f);
  for (int64_t j = threadIdx.x; j < sp.head; j += kThreads) g[j] = zero;
  uint4* body = reinterpret_cast<uint4*>(g + sp.head);
  for (int64_t v = threadIdx.x; v < sp.nvec; v += kThreads) body[v] = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t j = sp.head + sp.nvec * V + threadIdx.x; j < n; j += kThreads) g[j] = zero;
}

template <typename T>
__device__ __forceinline__ void dense_row(const T* x, T* g, int64_t n, const DenseCoef& d, bool vec_ok) {
  constexpr int V = VecWidth<T>::value;
  const RowSplit sp = vec_ok ? split_row(x, n) : RowSplit{n, 0};
  for (int64_t j = threadIdx.x; j < sp.head; j += kThreads) g[j] = from_f<T>(dense_value(d, to_f(x[j]), j));
  const uint4* in = reinterpret_cast<const uint4*>(x + sp.head);
  uint4* out = reinterpret_cast<uint4*>(g + sp.head);
  for (int64_t v0 = threadIdx.x; v0 < sp.nvec; v0 += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (v < sp.nvec) raw[u] = __ldg(in + v);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (v < sp.nvec) {
        float f[V];
        unpack<T>(raw[u], f);
        const int64_t col = sp.head + v * V;
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] = dense_value(d, f[i], col + i);
        out[v] = pack<T>(f);
      }
    }
  }
  for (int64_t j = sp.head + sp.nvec * V + threadIdx.x; j < n; j += kThreads)
    g[j] = from_f<T>(dense_value(d, to_f(x[j]), j));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kd_pass2_kernel(const KDPass2Args a, bool vec_ok) {
  extern __shared__ float sm[];  // 2 k floats: [log Q_i | teacher log p_i -> w_i -> K coefficient]
  __shared__ float red[kWarps];
  const int64_t row = blockIdx.x;
  const int k = a.k;
  float* lq = sm;
  float* aux = sm + k;
  const T* x = static_cast<const T*>(a.logits) + row * a.vl;
  T* g = a.grad != nullptr ? static_cast<T*>(a.grad) + row * a.vl : nullptr;
  const float* st = a.stats + row * (4 + k);
  const int32_t* ids = a.ids + row * k;
  float* terms = a.terms + row * 2;
  const float wr = a.row_weight[row];
  if (wr == 0.f) {  // masked token: no loss, zero gradient row
    if (threadIdx.x == 0) terms[0] = terms[1] = 0.f;
    if (g != nullptr) zero_row(g, a.vl, vec_ok);
    return;
  }

  const RowStats rs{a.m2[2 * row], a.m2[2 * row + 1], st[0], st[1], st[2], st[3]};
  // Steps 1-4 (kd_loss_device.cuh): loss terms; lq = log Q at K, aux = w_i.
  const RowTerms rt = row_terms(a, row, rs, st + 4, lq, aux, red);
  if (threadIdx.x == 0) {
    terms[0] = a.kd_scale * rt.D;
    terms[1] = rt.ce;
  }
  if (g == nullptr) return;

  // Step 5: gradient coefficients (row weight folded in); aux becomes the K-column coefficients.
  const DenseCoef dc = grad_coefs(a, row, rs, rt, wr, lq, aux);

  // Step 6: dense row, then the k columns of K overwritten after a barrier.
  if (dense_is_zero(dc)) {
    zero_row(g, a.vl, vec_ok);
  } else {
    dense_row(x, g, a.vl, dc, vec_ok);
  }
  __syncthreads();  // orders the dense stores before the overwrites below (same block)
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
    if (local < 0 || local >= a.real) continue;
    g[local] = from_f<T>(k_column_value(dc, aux[i], to_f(x[local]), local));
  }
}

// ------------------------------------------------------------------------------- grad scaling

template <typename T>
__global__ void __launch_bounds__(kThreads) kd_scale_kernel(T* data, int64_t numel, const float* factor, bool vec_ok) {
  constexpr int V = VecWidth<T>::value;
  const float f = *factor;
  if (f == 1.f) return;  // the common grad_output == 1: no pass over the buffer
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nvec = vec_ok ? numel / V : 0;
  uint4* body = reinterpret_cast<uint4*>(data);
  for (int64_t v = tid; v < nvec; v += stride) {
    float e[V];
    unpack<T>(body[v], e);
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] *= f;
    body[v] = pack<T>(e);
  }
  for (int64_t j = nvec * V + tid; j < numel; j += stride) data[j] = from_f<T>(to_f(data[j]) * f);
}

template <typename T>
cudaError_t pass1_typed(const KDPass1Args& a, cudaStream_t stream) {
  const int smem = a.dense ? kd_pass1_smem_bytes(a.vl) : 0;  // the K bitmap is only used by the dense scan
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kd_pass1_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kd_pass1_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pass2_typed(const KDPass2Args& a, cudaStream_t stream) {
  // The dense loop vectorises input and output with one row split: same misalignment needed.
  const bool vec_ok = a.grad == nullptr ||
                      (reinterpret_cast<uintptr_t>(a.logits) & 15u) == (reinterpret_cast<uintptr_t>(a.grad) & 15u);
  kd_pass2_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, kd_pass2_smem_bytes(a.k), stream>>>(a, vec_ok);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scale_typed(void* data, int64_t numel, const float* factor, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(data) & 15u) == 0;
  int64_t blocks = (numel / V + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > 8192) blocks = 8192;
  kd_scale_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<T*>(data), numel, factor,
                                                                               vec_ok);
  return cudaGetLastError();
}

}  // namespace

int kd_pass1_smem_bytes(int64_t vl) { return static_cast<int>(((vl + 31) / 32 + 1) * sizeof(uint32_t)); }

int kd_pass2_smem_bytes(int k) { return 2 * k * static_cast<int>(sizeof(float)); }

int kd_max_dynamic_smem(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 48 * 1024;
  return v;
}

cudaError_t kd_pass1_launch(KDDtype dtype, const KDPass1Args& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  switch (dtype) {
    case KDDtype::kFloat32: return pass1_typed<float>(args, stream);
    case KDDtype::kFloat16: return pass1_typed<__half>(args, stream);
    case KDDtype::kBFloat16: return pass1_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kd_pass2_launch(KDDtype dtype, const KDPass2Args& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  switch (dtype) {
    case KDDtype::kFloat32: return pass2_typed<float>(args, stream);
    case KDDtype::kFloat16: return pass2_typed<__half>(args, stream);
    case KDDtype::kBFloat16: return pass2_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kd_scale_launch(KDDtype dtype, void* data, int64_t numel, const float* factor, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case KDDtype::kFloat32: return scale_typed<float>(data, numel, factor, stream);
    case KDDtype::kFloat16: return scale_typed<__half>(data, numel, factor, stream);
    case KDDtype::kBFloat16: return scale_typed<__nv_bfloat16>(data, numel, factor, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kdtrain

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
// K: the teacher's k distinct top ids; p_i the teacher probabilities at K (from its logits and
// log-normaliser, or its log-probs, or normalised over K when no normaliser was sent).
//
// Support of the divergence, n outcomes:
//   tail mode   : i in K plus, when k < V, the tail bucket t with P_t = max(0, 1 - sum_K p),
//                 Q_t = T / Z where T = sum_{j not in K} exp(s_j - m), Z = sum_j exp(s_j - m).
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
//              bucket : log Q_t = log T - log Z           -> d/ds_j = [j not in K] q_j / Q_t - q_j
//   so with W = sum_{all outcomes} w_i:
//     dD/ds_{K_i}       = w_i - Q_i W                                            (Q_i = q_{K_i})
//     dD/ds_j, j not K  = q_j (w_t / Q_t - W) = e_j (w_t - Q_t W) / T,  e_j = exp(s_j - m)
//   An empty student tail (T == 0, floored) is a constant: w_t = 0 and the coefficient is 0.
//   renorm mode : log Q_i = s_{K_i} - log sum_K exp(s_K) -> dD/ds_{K_i} = w_i - Q_i W, else 0.
//
// Per-row loss: loss = (1 - alpha) c D + alpha CE,  c = tau^2 (scale_by_tau_sq) or 1,
//   CE = logsumexp(z) - z_y (temperature 1), dCE/dz_j = softmax(z)_j - [j = y].
// Gradient written by pass 2 (row weight w_r = valid / num_tokens; for fp16 logits w_r = valid and
// 1 / num_tokens is applied by the backward scaling, so fp16 gradients do not underflow):
//   g_j = w_r [ (1-alpha) c / tau * dD/ds_j + alpha (exp(z_j - tau m) / Z1 - [j = y]) ]
// i.e. a dense part  A' e_j + B' e1_j  over all real columns (A' from the tail coefficient,
// B' = w_r alpha / Z1, e1_j = exp(z_j - tau m)), a -w_r alpha at the label, and at the ids of K
// the dense KD part replaced by (1-alpha) c / tau (w_i - Q_i W). Pass 2 writes the dense part
// with vector stores, synchronises the block, then overwrites the k columns of K (a column is
// written by one thread after the barrier, so the row is deterministic).
//
// Exponentials use base 2: s2_j = z_j * log2(e) / tau, m2 = max s2, e_j = 2^(s2_j - m2).
// ----------------------------------------------------------------------------------------------

#include "kd_loss.h"
#include "kd_loss_device.cuh"

#include <cstdint>

namespace kdtrain {
namespace {

using namespace kd;  // NOLINT: the helpers of kd_loss_device.cuh

// ------------------------------------------------------------------------------------- pass 1

// Online (max, sum-exp) state in base 2: z = sum 2^(x - m) over all columns, t over the columns
// outside K, z1 = sum 2^(tau (x - m)) for the temperature-1 CE normaliser.
struct Online {
  float m, z, t, z1;
};

__device__ __forceinline__ void online_merge(Online& a, const Online& b, float tau, bool ce1) {
  const float mn = fmaxf(a.m, b.m);
  if (mn == kNegInf) return;  // both empty
  const float fa = exp2f(a.m - mn), fb = exp2f(b.m - mn);  // 2^-inf = 0 for an empty side
  a.z = a.z * fa + b.z * fb;  // commutative: both shuffle partners compute identical bits
  a.t = a.t * fa + b.t * fb;
  if (ce1) a.z1 = a.z1 * exp2f(tau * (a.m - mn)) + b.z1 * exp2f(tau * (b.m - mn));
  a.m = mn;
}

// Add n values x (already in base-2 units) whose K-membership is bit i of in_k.
template <int N>
__device__ __forceinline__ void online_add(Online& s, const float* x, uint32_t in_k, float tau, bool ce1) {
  float vmax = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vmax = fmaxf(vmax, x[i]);
  if (vmax > s.m) {  // rescale once per vector, not per element
    const float f = exp2f(s.m - vmax);
    s.z *= f;
    s.t *= f;
    if (ce1) s.z1 *= exp2f(tau * (s.m - vmax));
    s.m = vmax;
  }
  const float ms = s.m == kNegInf ? 0.f : s.m;  // all -inf so far: every term is 0
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = exp2f(x[i] - ms);
    s.z += e;
    s.t += ((in_k >> i) & 1u) ? 0.f : e;
    if (ce1) s.z1 += exp2f(tau * (x[i] - ms));
  }
}

// Bits col .. col+31 of the K bitmap (the bitmap has one spare zero word at the end).
__device__ __forceinline__ uint32_t k_bits(const uint32_t* bitmap, int64_t col) {
  const int64_t w = col >> 5;
  const uint64_t win = static_cast<uint64_t>(bitmap[w]) | (static_cast<uint64_t>(bitmap[w + 1]) << 32);
  return static_cast<uint32_t>(win >> (col & 31));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kd_pass1_kernel(const KDPass1Args a) {
  extern __shared__ uint32_t bitmap[];  // K membership of this shard's columns
  __shared__ float red_m[kWarps], red_z[kWarps], red_t[kWarps], red_z1[kWarps];
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
      a.m2[row] = 0.f;
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
  Online s{kNegInf, 0.f, 0.f, 0.f};
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

  // Block reduction of the online states: butterfly within warps, then warps in order.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Online b;
    b.m = __shfl_xor_sync(0xffffffffu, s.m, o);
    b.z = __shfl_xor_sync(0xffffffffu, s.z, o);
    b.t = __shfl_xor_sync(0xffffffffu, s.t, o);
    b.z1 = __shfl_xor_sync(0xffffffffu, s.z1, o);
    online_merge(s, b, tau, ce1);
  }
  if ((threadIdx.x & 31) == 0) {
    const int w = threadIdx.x >> 5;
    red_m[w] = s.m;
    red_z[w] = s.z;
    red_t[w] = s.t;
    red_z1[w] = s.z1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Online r{red_m[0], red_z[0], red_t[0], red_z1[0]};
    for (int w = 1; w < kWarps; ++w) online_merge(r, Online{red_m[w], red_z[w], red_t[w], red_z1[w]}, tau, ce1);
    a.m2[row] = r.m;
    st[0] = r.z;
    st[1] = r.t;
    st[3] = a.ce ? (ce1 ? r.z1 : r.z) : 0.f;
  }
}

// ------------------------------------------------------------------------------------- pass 2

// d_i and w_i = dD/dlog Q_i of one outcome (see the header comment); 0 * log 0 = 0.
__device__ __forceinline__ void divergence_terms(int div, float beta, float P, float logP, float Q, float logQ,
                                                 float& d, float& w) {
  if (div == 0) {
    d = P > 0.f ? P * (logP - logQ) : 0.f;
    w = -P;
  } else if (div == 1) {
    d = Q > 0.f ? Q * (logQ - logP) : 0.f;
    w = d;
  } else {
    // log M = logaddexp(log beta + log P, log(1 - beta) + log Q), computed stably.
    const float a = logf(beta) + logP, b = log1pf(-beta) + logQ;
    const float hi = fmaxf(a, b), lo = fminf(a, b);
    const float logM = hi + log1pf(expf(lo - hi));
    const float kq = Q > 0.f ? Q * (logQ - logM) : 0.f;
    d = beta * (P > 0.f ? P * (logP - logM) : 0.f) + (1.f - beta) * kq;
    w = (1.f - beta) * kq;
  }
}

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

// Dense part of the gradient row: g_j = A2 e_j + B2 e1_j - [j = y] L2 on real columns, 0 on padding.
struct DenseCoef {
  float c, m2, tau_m2, A2, B2, AB, L2;
  int64_t real, y_local;
  bool kd, ce, same_exp;
};

__device__ __forceinline__ float dense_value(const DenseCoef& d, float z, int64_t j) {
  if (j >= d.real) return 0.f;
  float v;
  if (d.same_exp) {  // tau == 1: e1 == e
    v = d.AB * exp2f(fmaf(z, d.c, -d.m2));
  } else {
    v = d.kd ? d.A2 * exp2f(fmaf(z, d.c, -d.m2)) : 0.f;
    if (d.ce) v += d.B2 * exp2f(fmaf(z, kLog2e, -d.tau_m2));
  }
  return j == d.y_local ? v - d.L2 : v;
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
  const float* vals = a.values + row * k;
  const int32_t* ids = a.ids + row * k;
  float* terms = a.terms + row * 2;
  const float wr = a.row_weight[row];
  if (wr == 0.f) {  // masked token: no loss, zero gradient row
    if (threadIdx.x == 0) terms[0] = terms[1] = 0.f;
    if (g != nullptr) zero_row(g, a.vl, vec_ok);
    return;
  }

  const float tau = a.tau, inv_tau = 1.f / tau;
  const float Z = st[0], Tsum = st[1], zy = st[2], Z1 = st[3];
  const float m2 = a.m2[row];
  const float lse_t = a.values_mode == 1 ? a.teacher_lse[row] : 0.f;

  // Step 1: s_K = z_K / tau and the teacher's (possibly unnormalised) log p at K.
  float mx_p = kNegInf, mx_s = kNegInf;
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const float s = st[4 + i] / tau;  // divisions here (k per row) keep s and log p correctly rounded
    const float v = vals[i];
    const float lp = a.values_mode == 0 ? v : v / tau - lse_t;
    lq[i] = s;
    aux[i] = lp;
    mx_p = fmaxf(mx_p, lp);
    mx_s = fmaxf(mx_s, s);
  }
  // Step 2: normalisers. Each log-distribution is (x - shift) - log(sum): subtracting the shift
  // first (x and shift are close) keeps the large parts exact instead of rounding shift + log(sum).
  // Each thread reads back only the entries it wrote.
  float shift_p = 0.f, lsum_p = 0.f;
  if (a.values_mode == 2 || !a.tail) {
    shift_p = block_max(mx_p, red);
    float acc = 0.f;
    for (int i = threadIdx.x; i < k; i += kThreads) acc += expf(aux[i] - shift_p);
    lsum_p = logf(block_sum(acc, red));
  }
  float shift_q, lsum_q;
  if (a.tail) {
    shift_q = m2 * kLn2;  // the global row max of s; Z is relative to it
    lsum_q = logf(Z);
  } else {
    shift_q = block_max(mx_s, red);
    float acc = 0.f;
    for (int i = threadIdx.x; i < k; i += kThreads) acc += expf(lq[i] - shift_q);
    lsum_q = logf(block_sum(acc, red));
  }
  // Step 3: per-outcome divergence terms over K.
  float d_loc = 0.f, w_loc = 0.f, p_loc = 0.f;
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const float logP = (aux[i] - shift_p) - lsum_p, logQ = (lq[i] - shift_q) - lsum_q;
    const float P = expf(logP), Q = expf(logQ);
    float d, w;
    divergence_terms(a.divergence, a.beta, P, logP, Q, logQ, d, w);
    d_loc += d;
    w_loc += w;
    p_loc += P;
    lq[i] = logQ;
    aux[i] = w;
  }
  float D = block_sum(d_loc, red);
  float W = block_sum(w_loc, red);
  // Step 4: the tail bucket (every thread computes the same scalars).
  float A = 0.f;
  if (a.tail && a.has_tail) {
    // Teacher logits without a normaliser are normalised over K: their tail is 0 by definition.
    const float Pt = a.values_mode == 2 ? 0.f : fmaxf(1.f - block_sum(p_loc, red), 0.f);
    const float logPt = Pt > 0.f ? logf(Pt) : a.log_floor;
    const bool tpos = Tsum > 0.f;
    const float logQt = tpos ? logf(Tsum) - logf(Z) : a.log_floor;
    const float Qt = expf(logQt);
    float dt, wt;
    divergence_terms(a.divergence, a.beta, Pt, logPt, Qt, logQt, dt, wt);
    if (!tpos) wt = 0.f;  // floored tail: constant, no gradient path
    D += dt;
    W += wt;
    A = tpos ? (wt - Qt * W) / Tsum : 0.f;
  }
  const float ce = a.alpha > 0.f ? fmaf(tau * m2, kLn2, logf(Z1)) - zy : 0.f;
  if (threadIdx.x == 0) {
    terms[0] = a.kd_scale * D;
    terms[1] = ce;
  }
  if (g == nullptr) return;

  // Step 5: gradient coefficients (row weight folded in).
  const float coef = wr * (1.f - a.alpha) * a.kd_scale * inv_tau;
  for (int i = threadIdx.x; i < k; i += kThreads) aux[i] = coef * (aux[i] - expf(lq[i]) * W);
  DenseCoef dc;
  dc.c = kLog2e * inv_tau;
  dc.m2 = m2;
  dc.tau_m2 = tau * m2;
  dc.A2 = coef * A;
  dc.B2 = a.alpha > 0.f ? wr * a.alpha / Z1 : 0.f;
  dc.AB = dc.A2 + dc.B2;
  dc.L2 = wr * a.alpha;
  dc.real = a.real;
  dc.y_local = -1;
  if (a.alpha > 0.f && a.labels != nullptr) {
    const int64_t yl = a.labels[row] - a.start;
    if (yl >= 0 && yl < a.real) dc.y_local = yl;
  }
  dc.kd = dc.A2 != 0.f;
  dc.ce = dc.B2 != 0.f;
  dc.same_exp = tau == 1.f;

  // Step 6: dense row, then the k columns of K overwritten after a barrier.
  if (!dc.kd && !dc.ce && dc.y_local < 0) {
    zero_row(g, a.vl, vec_ok);
  } else {
    dense_row(x, g, a.vl, dc, vec_ok);
  }
  __syncthreads();  // orders the dense stores before the overwrites below (same block)
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const int64_t local = static_cast<int64_t>(ids[i]) - a.start;
    if (local < 0 || local >= a.real) continue;
    float v = aux[i];
    if (dc.ce) v += dc.B2 * exp2f(fmaf(to_f(x[local]), kLog2e, -dc.tau_m2));
    if (local == dc.y_local) v -= dc.L2;
    g[local] = from_f<T>(v);
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

// Device helpers of the fused KD-loss kernels: dtype conversion, 16-byte vectors, row splitting,
// deterministic warp/block reductions, and the per-row math shared by the two-pass kernels
// (kd_loss_kernel.cu) and the single-read cluster kernel (kd_loss_single.cu): the online
// (max, sum-exp) statistics of pass 1 and the loss terms / gradient coefficients of pass 2.
// The derivation is in the header comment of kd_loss_kernel.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kd_loss.h"

namespace kdtrain {
namespace kd {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;  // 16-byte loads in flight per thread and iteration
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte vector.
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VecWidth<T>::value; ++i) out[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < VecWidth<T>::value; ++i) e[i] = from_f<T>(in[i]);
  return raw;
}

// A row of n elements = scalar head (up to the first 16-byte boundary), nvec 16-byte vectors,
// scalar tail. Rows of an [rows, vl] tensor are misaligned differently when vl * sizeof(T) is not
// a multiple of 16, so the split is per row.
struct RowSplit {
  int64_t head;
  int64_t nvec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t n) {
  constexpr int V = VecWidth<T>::value;
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
  int64_t head = mis ? V - mis : 0;
  if (head > n) head = n;
  return {head, (n - head) / V};
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max returned to every thread. Warp partials are combined in warp order by every
// thread, so all threads get the same bits and the result does not depend on scheduling.
__device__ inline float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // red may still be read by the previous reduction
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += red[w];
  return t;
}

__device__ inline float block_max(float v, float* red) {
  v = warp_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = kNegInf;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t = fmaxf(t, red[w]);
  return t;
}


// ------------------------------------------------------------------------ pass-1 statistics

// Online (max, sum-exp) state in base 2, two groups of columns with a running maximum each:
// zk = sum 2^(x - m) over the columns of K, where m is the maximum over all columns, and
// t = sum 2^(x - mt) over the columns outside K, where mt is the maximum over those columns; z1 =
// sum 2^(tau (x - m)) over all columns for the temperature-1 CE normaliser. The tail keeps its own
// maximum so that it cannot underflow however far below the top-k it lies (a collapsed student at
// a low temperature: 2^(x - m) is 0 for every tail column once they are ~126 units below m, and
// the tail bucket would lose all of its gradient). Each column still costs one exponential.
struct Online {
  float m, zk, mt, t, z1;
};
constexpr int kOnlineFloats = 5;

__device__ __forceinline__ void online_merge(Online& a, const Online& b, float tau, bool ce1) {
  // 2^-inf = 0 for an empty side. (Shuffle partners may round differently where nvcc contracts
  // a*b + c*d into an FMA; only lane 0's result is kept and the warps merge in a fixed order, so
  // the block's result is deterministic.)
  const float mn = fmaxf(a.m, b.m);
  if (mn == kNegInf) return;  // both empty (then both tails are empty too)
  const float fa = exp2f(a.m - mn), fb = exp2f(b.m - mn);
  a.zk = a.zk * fa + b.zk * fb;
  if (ce1) a.z1 = a.z1 * exp2f(tau * (a.m - mn)) + b.z1 * exp2f(tau * (b.m - mn));
  a.m = mn;
  const float mtn = fmaxf(a.mt, b.mt);
  if (mtn == kNegInf) return;  // no column outside K on either side
  a.t = a.t * exp2f(a.mt - mtn) + b.t * exp2f(b.mt - mtn);
  a.mt = mtn;
}

// Add n values x (already in base-2 units) whose K-membership is bit i of in_k.
template <int N>
__device__ __forceinline__ void online_add(Online& s, const float* x, uint32_t in_k, float tau, bool ce1) {
  float vmax = x[0], tmax = (in_k & 1u) ? kNegInf : x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) {
    vmax = fmaxf(vmax, x[i]);
    tmax = ((in_k >> i) & 1u) ? tmax : fmaxf(tmax, x[i]);
  }
  if (vmax > s.m) {  // rescale once per vector, not per element
    s.zk *= exp2f(s.m - vmax);
    if (ce1) s.z1 *= exp2f(tau * (s.m - vmax));
    s.m = vmax;
  }
  if (tmax > s.mt) {
    s.t *= exp2f(s.mt - tmax);
    s.mt = tmax;
  }
  const float ms = s.m == kNegInf ? 0.f : s.m;  // all -inf so far: every term is 0
  const float mts = s.mt == kNegInf ? 0.f : s.mt;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const bool in = (in_k >> i) & 1u;
    const float e = exp2f(x[i] - (in ? ms : mts));
    s.zk += in ? e : 0.f;
    s.t += in ? 0.f : e;
    if (ce1) s.z1 += exp2f(tau * (x[i] - ms));
  }
}

// Z = sum 2^(x - m) over all columns, from the two groups.
__device__ __forceinline__ float online_total(const Online& s) {
  return s.mt == kNegInf ? s.zk : s.zk + s.t * exp2f(s.mt - s.m);
}

// Bits col .. col+31 of the K bitmap (the bitmap has one spare zero word at the end).
__device__ __forceinline__ uint32_t k_bits(const uint32_t* bitmap, int64_t col) {
  const int64_t w = col >> 5;
  const uint64_t win = static_cast<uint64_t>(bitmap[w]) | (static_cast<uint64_t>(bitmap[w + 1]) << 32);
  return static_cast<uint32_t>(win >> (col & 31));
}

// Block reduction of the online states: butterfly within warps, then the warps in order. red5
// holds kOnlineFloats * kWarps floats. Every thread merges the warp partials in the same order,
// so every thread returns the same bits.
__device__ inline Online block_online(Online s, float tau, bool ce1, float* red5) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Online b;
    b.m = __shfl_xor_sync(0xffffffffu, s.m, o);
    b.zk = __shfl_xor_sync(0xffffffffu, s.zk, o);
    b.mt = __shfl_xor_sync(0xffffffffu, s.mt, o);
    b.t = __shfl_xor_sync(0xffffffffu, s.t, o);
    b.z1 = __shfl_xor_sync(0xffffffffu, s.z1, o);
    online_merge(s, b, tau, ce1);
  }
  if ((threadIdx.x & 31) == 0) {
    const int w = threadIdx.x >> 5;
    red5[w] = s.m;
    red5[kWarps + w] = s.zk;
    red5[2 * kWarps + w] = s.mt;
    red5[3 * kWarps + w] = s.t;
    red5[4 * kWarps + w] = s.z1;
  }
  __syncthreads();
  Online r{red5[0], red5[kWarps], red5[2 * kWarps], red5[3 * kWarps], red5[4 * kWarps]};
  for (int w = 1; w < kWarps; ++w)
    online_merge(r, Online{red5[w], red5[kWarps + w], red5[2 * kWarps + w], red5[3 * kWarps + w],
                           red5[4 * kWarps + w]}, tau, ce1);
  return r;
}

// ------------------------------------------------------------------- pass-2 per-row math

// log(X / M) for the mixture M = a Y + b X (a + b = 1), from d = log Y - log X:
// -logaddexp(log a + d, log b). As log X - log M it is a difference of two O(1) logs whose value
// is O(a) for a small weight, lost to rounding; from d, with log a and log b exact, it keeps full
// precision (kdtrain/loss/kd_reference.py: log_ratio_to_mix).
__device__ __forceinline__ float log_ratio_to_mix(float d, float log_a, float log_b) {
  const float u = d + log_a;
  const float hi = fmaxf(u, log_b), lo = fminf(u, log_b);
  return -(hi + log1pf(expf(lo - hi)));
}

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
    // log beta and log(1 - beta) from beta itself: 1 - beta rounds away most of a small beta.
    const float lb = logf(beta), l1b = log1pf(-beta);
    const float kq = Q > 0.f ? Q * log_ratio_to_mix(logP - logQ, lb, l1b) : 0.f;  // Q log(Q / M)
    d = beta * (P > 0.f ? P * log_ratio_to_mix(logQ - logP, l1b, lb) : 0.f) + (1.f - beta) * kq;
    w = (1.f - beta) * kq;
  }
}

// Dense part of the gradient row: g_j = A2 et_j + B2 e1_j - [j = y] L2 on real columns, 0 on
// padding, with et_j = 2^(s2_j - mk) relative to the tail's maximum mk (the row maximum when the
// row has no column outside K). The columns of K are overwritten afterwards (k_column_value).
struct DenseCoef {
  float c, mk, tau_m2, A2, B2, AB, L2;
  int64_t real, y_local;
  bool kd, ce, same_exp;
};

__device__ __forceinline__ float dense_value(const DenseCoef& d, float z, int64_t j) {
  if (j >= d.real) return 0.f;
  float v;
  if (d.same_exp) {  // tau == 1: e1_j = et_j 2^(mk - m2), folded into AB
    v = d.AB * exp2f(fmaf(z, d.c, -d.mk));
  } else {
    v = d.kd ? d.A2 * exp2f(fmaf(z, d.c, -d.mk)) : 0.f;
    if (d.ce) v += d.B2 * exp2f(fmaf(z, kLog2e, -d.tau_m2));
  }
  return j == d.y_local ? v - d.L2 : v;
}


// The globally reduced statistics of one row (pass 1 + the cross-rank reduction, or the
// cluster reduction of the single-read kernel): the row maximum m2 and the tail's own maximum
// mt2 (base 2; -inf when no real column lies outside K), Z relative to m2, T relative to mt2.
struct RowStats {
  float m2, mt2, Z, T, zy, Z1;
};

// Per-row results of steps 1-4: D (divergence), W = sum_i w_i, A (tail coefficient), CE.
struct RowTerms {
  float D, W, A, ce;
};

// Steps 1-4 of pass 2 for one row, all threads of the block. zK[i]: the raw student logit at K_i
// (0 off-shard; it may alias lq: thread i reads zK[i] before writing lq[i]). On return
// lq[i] = log Q_i and aux[i] = w_i (each thread reads back only the entries it wrote, so no
// barrier is needed before the caller's own loops over i with the same stride).
__device__ inline RowTerms row_terms(const KDPass2Args& a, int64_t row, const RowStats& rs, const float* zK,
                                     float* lq, float* aux, float* red) {
  const int k = a.k;
  const float tau = a.tau;
  // values_mode 1 in tail mode: the teacher's distribution is the softmax over K and one more
  // outcome, the tail, whose logit is the teacher's own logsumexp over the ids outside K (exact
  // for a confident teacher, where 1 - sum_K p would be lost in rounding).
  const bool own_tail = a.values_mode == 1 && a.tail;
  const float tail_t = own_tail ? a.teacher_tail_lse[row] : kNegInf;
  const float* vals = a.values + row * k;

  // Step 1: s_K = z_K / tau and the teacher's (possibly unnormalised) log p at K.
  float mx_p = kNegInf, mx_s = kNegInf;
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const float s = zK[i] / tau;  // a division per K entry (k per row), not a multiply by 1/tau
    const float v = vals[i];
    const float lp = a.values_mode == 0 ? v : v / tau;
    lq[i] = s;
    aux[i] = lp;
    mx_p = fmaxf(mx_p, lp);
    mx_s = fmaxf(mx_s, s);
  }
  // Step 2: normalisers. Each log-distribution is (x - shift) - log(sum): subtracting the shift
  // first (x and shift are close) keeps the large parts exact instead of rounding shift + log(sum).
  float shift_p = 0.f, lsum_p = 0.f;
  if (a.values_mode != 0 || !a.tail) {
    shift_p = fmaxf(block_max(mx_p, red), tail_t);
    float acc = 0.f;
    for (int i = threadIdx.x; i < k; i += kThreads) acc += expf(aux[i] - shift_p);
    lsum_p = logf(block_sum(acc, red) + (own_tail ? expf(tail_t - shift_p) : 0.f));
  }
  float shift_q, lsum_q;
  if (a.tail) {
    shift_q = rs.m2 * kLn2;  // the global row max of s; Z is relative to it
    lsum_q = logf(rs.Z);
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
  RowTerms r;
  r.D = block_sum(d_loc, red);
  r.W = block_sum(w_loc, red);
  r.A = 0.f;
  // Step 4: the tail bucket (every thread computes the same scalars).
  if (a.tail && a.has_tail) {
    // Teacher logits without a tail are normalised over K: their tail is 0 by definition.
    // Log-probs: the tail is what K leaves of 1.
    float Pt, logPt;
    if (own_tail) {
      // Floored only when empty: a tail far below 2^-126 keeps its exact log (reverse KL charges it).
      logPt = tail_t > kNegInf ? (tail_t - shift_p) - lsum_p : a.log_floor;
      Pt = expf(logPt);
    } else {
      Pt = a.values_mode == 2 ? 0.f : fmaxf(1.f - block_sum(p_loc, red), 0.f);
      logPt = Pt > 0.f ? logf(Pt) : a.log_floor;
    }
    const bool tpos = rs.T > 0.f;
    const float logQt = tpos ? fmaf(rs.mt2 - rs.m2, kLn2, logf(rs.T)) - logf(rs.Z) : a.log_floor;
    const float Qt = expf(logQt);
    float dt, wt;
    divergence_terms(a.divergence, a.beta, Pt, logPt, Qt, logQt, dt, wt);
    if (!tpos) wt = 0.f;  // floored tail: constant, no gradient path
    r.D += dt;
    r.W += wt;
    r.A = tpos ? (wt - Qt * r.W) / rs.T : 0.f;
  }
  r.ce = a.alpha > 0.f ? fmaf(tau * rs.m2, kLn2, logf(rs.Z1)) - rs.zy : 0.f;
  return r;
}

// Step 5 of pass 2: the gradient coefficients (row weight wr folded in). aux[i] becomes the KD
// gradient of column K_i (same thread-to-i mapping as row_terms); returns the dense coefficients.
__device__ inline DenseCoef grad_coefs(const KDPass2Args& a, int64_t row, const RowStats& rs, const RowTerms& rt,
                                       float wr, const float* lq, float* aux) {
  const float tau = a.tau, inv_tau = 1.f / tau;
  const float coef = wr * (1.f - a.alpha) * a.kd_scale * inv_tau;
  for (int i = threadIdx.x; i < a.k; i += kThreads) aux[i] = coef * (aux[i] - expf(lq[i]) * rt.W);
  DenseCoef dc;
  dc.c = kLog2e * inv_tau;
  dc.mk = rs.mt2 == kNegInf ? rs.m2 : rs.mt2;  // rt.A is relative to mt2 (and 0 without a tail)
  dc.tau_m2 = tau * rs.m2;
  dc.A2 = coef * rt.A;
  dc.B2 = a.alpha > 0.f ? wr * a.alpha / rs.Z1 : 0.f;
  // At tau == 1 one exponential serves both parts: B2 e1_j = B2 2^(mk - m2) et_j. 2^(mk - m2) <= 1,
  // and a product that underflows is a CE gradient below 2^-126 on the columns outside K.
  dc.AB = dc.A2 + dc.B2 * (dc.mk == rs.m2 ? 1.f : exp2f(dc.mk - rs.m2));
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
  return dc;
}

// Whether the dense part of the row is all zero (renorm without CE, no label in the shard).
__device__ __forceinline__ bool dense_is_zero(const DenseCoef& dc) { return !dc.kd && !dc.ce && dc.y_local < 0; }

// Final gradient of column `local` = K_i (raw logit z there): the KD coefficient replaces the
// dense KD part; the CE part and the label's -L2 are added as in dense_value.
__device__ __forceinline__ float k_column_value(const DenseCoef& dc, float aux_i, float z, int64_t local) {
  float v = aux_i;
  if (dc.ce) v += dc.B2 * exp2f(fmaf(z, kLog2e, -dc.tau_m2));
  if (local == dc.y_local) v -= dc.L2;
  return v;
}

}  // namespace kd
}  // namespace kdtrain

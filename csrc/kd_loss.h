// Fused top-k KD loss kernels: launch interface shared by kd_loss_kernel.cu and the bindings.
//
// Plain CUDA runtime types only (no torch headers), so the kernels compile fast and stand alone.
// The math, the statistics layout and the gradient derivation are documented in
// kd_loss_kernel.cu; kdtrain/loss/kd_emulate.py implements the same interface in pure torch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace kdtrain {

enum class KDDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kKDMaxTopK = 1024;

// Pass 1: per row (token) of the local shard, online row max / sum-exp, the tail sum outside
// the top-k set K (with its own maximum), and the gathers. Outputs (fp32):
//   m2[row, 0]           m2  = max_j z_j * log2(e) / tau over the real columns (base-2 units), -inf
//                        if the shard has no real column, 0 when !dense
//   m2[row, 1]           mt2 = the same maximum over the real columns outside K (-inf if none),
//                        0 when !dense
//   stats[row, 0]        Z  = sum_j 2^(z_j log2e / tau - m2)
//   stats[row, 1]        T  = sum over the real columns outside K of 2^(z_j log2e / tau - mt2)
//   stats[row, 2]        z_label if the label falls in this shard (and ce) else 0
//   stats[row, 3]        Z1 = sum_j 2^(z_j log2e - tau m2)  (CE at temperature 1; only if ce)
//   stats[row, 4 + i]    z_{K_i} if K_i falls in this shard else 0
struct KDPass1Args {
  const void* logits;     // [rows, vl], row-major, element type per KDDtype
  int64_t rows;
  int64_t vl;             // local (padded) vocab columns
  int64_t start;          // first global id of this shard
  int64_t real;           // real (non-padding) columns of this shard, 0 <= real <= vl
  const int32_t* ids;     // [rows, k] global top-k ids
  int k;
  const int64_t* labels;  // [rows] global label ids, or nullptr
  float tau;
  bool dense;             // compute the full-vocab statistics (else only the gathers)
  bool ce;                // hard-label CE is on
  float* m2;              // out [rows, 2]: (m2, mt2)
  float* stats;           // out [rows, 4 + k]
};

// Pass 2: per-token loss terms and the gradient of the local shard, from the globally reduced
// statistics. terms[row] = (kd_scale * D, CE) (0 where row_weight == 0);
// grad[row, :] = row_weight[row] * d loss_row / d z, loss_row = (1 - alpha) kd + alpha CE.
struct KDPass2Args {
  const void* logits;
  int64_t rows, vl, start, real;
  const int32_t* ids;          // [rows, k]
  int k;
  const float* values;         // [rows, k] teacher logits or log-probs
  const float* teacher_tail_lse;  // [rows] logsumexp(z / tau) outside K (values_mode == 1) or nullptr
  const int64_t* labels;       // [rows] or nullptr
  const float* m2;             // [rows, 2]: (m2, mt2), global
  const float* stats;          // [rows, 4 + k], global
  const float* row_weight;     // [rows]
  float tau, beta, kd_scale, alpha, log_floor;
  int divergence;              // 0 forward KL, 1 reverse KL, 2 JSD with 0 < beta < 1
  int values_mode;             // 0 log-probs, 1 logits with teacher_tail_lse, 2 logits normalised over K
  bool tail;                   // tail bucket (true) or renormalisation over K (false)
  bool has_tail;               // k < vocab_size: the tail bucket exists
  void* grad;                  // out [rows, vl] in the logits dtype, or nullptr (loss only)
  float* terms;                // out [rows, 2]
};

// Single-read path (one vocab shard, sm_90+; kd_loss_single.cu): one thread-block cluster per row,
// each CTA stages a contiguous slice of the row in shared memory, the pass-1 statistics are
// reduced across the cluster through distributed shared memory, and each CTA writes its slice's
// gradient. Same outputs as pass 1 + pass 2 with the statistics computed internally; takes a
// KDPass2Args whose m2 and stats are ignored. cluster == 0: not available (device below sm_90,
// kernels built without sm_90 code, or the row does not fit in 16 CTAs' shared memory).
constexpr int kKDSingleMaxCluster = 16;
constexpr int kKDSingleSmemBudget = 100 * 1024;  // per CTA: two CTAs fit in an H100 SM's 228 KiB
struct KDSinglePlan {
  int cluster;        // CTAs per row (a power of two), 0 if unsupported
  int smem;           // dynamic shared memory bytes per CTA
  int slice_bytes;    // bytes of the staged slice buffer (16-byte multiple)
  int bitmap_words;   // 32-bit words of the slice's K bitmap
  const char* why;    // reason when cluster == 0
};
KDSinglePlan kd_single_plan(KDDtype dtype, int64_t vl, int k, int device);
cudaError_t kd_single_launch(KDDtype dtype, const KDPass2Args& args, const KDSinglePlan& plan, cudaStream_t stream);

int kd_pass1_smem_bytes(int64_t vl);
int kd_pass2_smem_bytes(int k);
int kd_max_dynamic_smem(int device);
cudaError_t kd_pass1_launch(KDDtype dtype, const KDPass1Args& args, cudaStream_t stream);
cudaError_t kd_pass2_launch(KDDtype dtype, const KDPass2Args& args, cudaStream_t stream);
// data[:numel] *= *factor, skipped on the device (no host sync) when *factor == 1.
cudaError_t kd_scale_launch(KDDtype dtype, void* data, int64_t numel, const float* factor, cudaStream_t stream);

}  // namespace kdtrain

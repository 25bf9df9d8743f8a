// Python bindings of the fused KD-loss kernels: argument checks, output allocation, launch on the
// current CUDA stream. Built as kdtrain._C by setup.py or just in time by kdtrain/loss/_ext.py;
// kdtrain/loss/kd_fused.py calls these ops (kdtrain/loss/kd_emulate.py documents the interface).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kd_loss.h"

namespace {

kdtrain::KDDtype kd_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kdtrain::KDDtype::kFloat32;
    case at::kHalf: return kdtrain::KDDtype::kFloat16;
    case at::kBFloat16: return kdtrain::KDDtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return kdtrain::KDDtype::kFloat32;  // unreachable
}

void check_tensor(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name,
                  at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_logits_ids(const at::Tensor& logits, const at::Tensor& ids, int64_t start, int64_t real, double tau,
                      const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [rows, local_vocab], got shape ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  kd_dtype(logits, op);
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", logits.size(0), ")");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == logits.size(0), op, ": top-k ids must be [rows, k] with rows = ",
              logits.size(0), ", got shape ", ids.sizes());
  const int64_t k = ids.size(1);
  TORCH_CHECK(k >= 1 && k <= kdtrain::kKDMaxTopK, op, ": k must be in [1, ", kdtrain::kKDMaxTopK, "], got ", k);
  check_tensor(ids, logits, op, "top-k ids", at::kInt, {logits.size(0), k});
  TORCH_CHECK(start >= 0, op, ": shard start must be >= 0, got ", start);
  TORCH_CHECK(real >= 0 && real <= logits.size(1), op, ": real columns must be in [0, ", logits.size(1), "], got ",
              real);
  TORCH_CHECK(tau > 0, op, ": tau must be positive, got ", tau);
}

const int64_t* optional_labels(const std::optional<at::Tensor>& labels, const at::Tensor& logits, const char* op) {
  if (!labels.has_value() || !labels->defined()) return nullptr;
  check_tensor(*labels, logits, op, "labels", at::kLong, {logits.size(0)});
  return labels->data_ptr<int64_t>();
}

// Checks shared by kd_pass2 and kd_fused_single; returns (teacher tail lse, labels) pointers.
std::pair<const float*, const int64_t*> check_pass2_inputs(const at::Tensor& logits, const at::Tensor& values,
                                                           const std::optional<at::Tensor>& teacher_tail_lse,
                                                           const std::optional<at::Tensor>& labels,
                                                           const at::Tensor& row_weight, int64_t divergence,
                                                           double beta, int64_t values_mode, double alpha,
                                                           int64_t k, const char* op) {
  const int64_t rows = logits.size(0);
  check_tensor(values, logits, op, "teacher values", at::kFloat, {rows, k});
  check_tensor(row_weight, logits, op, "row weights", at::kFloat, {rows});
  TORCH_CHECK(divergence >= 0 && divergence <= 2, op, ": divergence must be 0 (forward KL), 1 (reverse KL) or 2 (JSD), "
              "got ", divergence);
  TORCH_CHECK(divergence != 2 || (beta > 0 && beta < 1), op, ": JSD needs 0 < beta < 1 (0 and 1 are the KLs), got ",
              beta);
  TORCH_CHECK(values_mode >= 0 && values_mode <= 2, op, ": values_mode must be 0, 1 or 2, got ", values_mode);
  TORCH_CHECK(alpha >= 0 && alpha <= 1, op, ": alpha must be in [0, 1], got ", alpha);
  const float* lse = nullptr;
  if (values_mode == 1) {
    TORCH_CHECK(teacher_tail_lse.has_value() && teacher_tail_lse->defined(), op,
                ": values_mode 1 needs teacher_tail_lse");
    check_tensor(*teacher_tail_lse, logits, op, "teacher tail lse", at::kFloat, {rows});
    lse = teacher_tail_lse->data_ptr<float>();
  }
  const int64_t* lab = optional_labels(labels, logits, op);
  TORCH_CHECK(alpha == 0 || lab != nullptr, op, ": alpha > 0 needs labels");
  return {lse, lab};
}

// Fills the fields of KDPass2Args common to kd_pass2 and kd_fused_single.
kdtrain::KDPass2Args pass2_args(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& values,
                                const float* lse, const int64_t* lab, const at::Tensor& row_weight, int64_t start,
                                int64_t real, double tau, int64_t divergence, double beta, bool tail, bool has_tail,
                                int64_t values_mode, double kd_scale, double alpha, double log_floor,
                                at::Tensor& grad, bool write_grad, at::Tensor& terms) {
  kdtrain::KDPass2Args a;
  a.logits = logits.data_ptr();
  a.rows = logits.size(0);
  a.vl = logits.size(1);
  a.start = start;
  a.real = real;
  a.ids = ids.data_ptr<int32_t>();
  a.k = static_cast<int>(ids.size(1));
  a.values = values.data_ptr<float>();
  a.teacher_tail_lse = lse;
  a.labels = lab;
  a.m2 = nullptr;
  a.stats = nullptr;
  a.row_weight = row_weight.data_ptr<float>();
  a.tau = static_cast<float>(tau);
  a.beta = static_cast<float>(beta);
  a.kd_scale = static_cast<float>(kd_scale);
  a.alpha = static_cast<float>(alpha);
  a.log_floor = static_cast<float>(log_floor);
  a.divergence = static_cast<int>(divergence);
  a.values_mode = static_cast<int>(values_mode);
  a.tail = tail;
  a.has_tail = has_tail;
  a.grad = write_grad ? grad.data_ptr() : nullptr;
  a.terms = terms.data_ptr<float>();
  return a;
}

}  // namespace

std::vector<at::Tensor> kd_pass1(const at::Tensor& logits, const at::Tensor& ids,
                                 const std::optional<at::Tensor>& labels, int64_t start, int64_t real, double tau,
                                 bool dense, bool ce) {
  const char* op = "kd_pass1";
  check_logits_ids(logits, ids, start, real, tau, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), k = ids.size(1);
  const int64_t* lab = optional_labels(labels, logits, op);
  TORCH_CHECK(!ce || lab != nullptr, op, ": ce=True needs labels");
  const int smem = kdtrain::kd_pass1_smem_bytes(logits.size(1));
  const int max_smem = kdtrain::kd_max_dynamic_smem(logits.get_device());
  TORCH_CHECK(!dense || smem <= max_smem, op, ": a local vocab of ", logits.size(1), " columns needs a ", smem,
              "-byte K bitmap, more than the ", max_smem, " bytes of shared memory per block: use more TP shards");
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor m2 = at::empty({rows, 2}, opts);
  at::Tensor stats = at::empty({rows, 4 + k}, opts);
  kdtrain::KDPass1Args a;
  a.logits = logits.data_ptr();
  a.rows = rows;
  a.vl = logits.size(1);
  a.start = start;
  a.real = real;
  a.ids = ids.data_ptr<int32_t>();
  a.k = static_cast<int>(k);
  a.labels = lab;
  a.tau = static_cast<float>(tau);
  a.dense = dense;
  a.ce = ce;
  a.m2 = m2.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  const cudaError_t err = kdtrain::kd_pass1_launch(kd_dtype(logits, op), a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {m2, stats};
}

std::vector<at::Tensor> kd_pass2(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& values,
                                 const std::optional<at::Tensor>& teacher_tail_lse,
                                 const std::optional<at::Tensor>& labels,
                                 const at::Tensor& m2, const at::Tensor& stats, const at::Tensor& row_weight,
                                 int64_t start, int64_t real, double tau, int64_t divergence, double beta, bool tail,
                                 bool has_tail, int64_t values_mode, double kd_scale, double alpha, double log_floor,
                                 bool write_grad) {
  const char* op = "kd_pass2";
  check_logits_ids(logits, ids, start, real, tau, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), k = ids.size(1);
  check_tensor(m2, logits, op, "row and tail maxima m2", at::kFloat, {rows, 2});
  check_tensor(stats, logits, op, "stats", at::kFloat, {rows, 4 + k});
  const auto [lse, lab] = check_pass2_inputs(logits, values, teacher_tail_lse, labels, row_weight, divergence, beta,
                                             values_mode, alpha, k, op);
  at::Tensor grad = write_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor terms = at::empty({rows, 2}, logits.options().dtype(at::kFloat));
  kdtrain::KDPass2Args a = pass2_args(logits, ids, values, lse, lab, row_weight, start, real, tau, divergence, beta,
                                      tail, has_tail, values_mode, kd_scale, alpha, log_floor, grad, write_grad, terms);
  a.m2 = m2.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  const cudaError_t err = kdtrain::kd_pass2_launch(kd_dtype(logits, op), a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {grad, terms};
}

namespace {

// The single-read plan for these logits and k, or cluster == 0 with the reason.
kdtrain::KDSinglePlan single_plan(const at::Tensor& logits, int64_t k) {
  const auto none = [](const char* why) { return kdtrain::KDSinglePlan{0, 0, 0, 0, why}; };
  if (!logits.is_cuda()) return none("logits are not on a CUDA device");
  if (logits.dim() != 2 || !logits.is_contiguous()) return none("logits are not a contiguous [rows, vocab] matrix");
  const auto t = logits.scalar_type();
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) return none("unsupported logits dtype");
  if (k < 1 || k > kdtrain::kKDMaxTopK) return none("k is outside [1, 1024]");
  const c10::cuda::CUDAGuard guard(logits.device());
  kdtrain::KDSinglePlan p = kdtrain::kd_single_plan(kd_dtype(logits, "kd_single_supported"), logits.size(1),
                                                    static_cast<int>(k), logits.get_device());
  if (p.cluster > 0 && logits.size(0) * p.cluster > std::numeric_limits<int32_t>::max()) {
    p.cluster = 0;
    p.why = "too many rows for one cluster launch";
  }
  return p;
}

}  // namespace

bool kd_single_supported(const at::Tensor& logits, int64_t k) { return single_plan(logits, k).cluster > 0; }

std::tuple<int64_t, int64_t, std::string> kd_single_info(const at::Tensor& logits, int64_t k) {
  const kdtrain::KDSinglePlan p = single_plan(logits, k);
  return {p.cluster, p.smem, p.cluster > 0 ? std::string("ok") : std::string(p.why ? p.why : "unavailable")};
}

std::vector<at::Tensor> kd_fused_single(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& values,
                                        const std::optional<at::Tensor>& teacher_tail_lse,
                                        const std::optional<at::Tensor>& labels, const at::Tensor& row_weight,
                                        int64_t start, int64_t real, double tau, int64_t divergence, double beta,
                                        bool tail, bool has_tail, int64_t values_mode, double kd_scale, double alpha,
                                        double log_floor, bool write_grad) {
  const char* op = "kd_fused_single";
  check_logits_ids(logits, ids, start, real, tau, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), k = ids.size(1);
  const auto [lse, lab] = check_pass2_inputs(logits, values, teacher_tail_lse, labels, row_weight, divergence, beta,
                                             values_mode, alpha, k, op);
  const kdtrain::KDSinglePlan plan = single_plan(logits, k);
  TORCH_CHECK(plan.cluster > 0, op, ": the single-read path is unavailable for logits of shape ", logits.sizes(),
              " (", plan.why ? plan.why : "unknown reason", "); use kd_pass1 + kd_pass2");
  at::Tensor grad = write_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  at::Tensor terms = at::empty({rows, 2}, logits.options().dtype(at::kFloat));
  const kdtrain::KDPass2Args a = pass2_args(logits, ids, values, lse, lab, row_weight, start, real, tau, divergence,
                                            beta, tail, has_tail, values_mode, kd_scale, alpha, log_floor, grad,
                                            write_grad, terms);
  const cudaError_t err = kdtrain::kd_single_launch(kd_dtype(logits, op), a, plan,
                                                    c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {grad, terms};
}

void kd_scale_grad_(at::Tensor& grad, const at::Tensor& factor) {
  const char* op = "kd_scale_grad_";
  TORCH_CHECK(grad.is_cuda() && grad.is_contiguous(), op, ": grad must be a contiguous CUDA tensor");
  check_tensor(factor, grad, op, "factor", at::kFloat, {1});
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaError_t err = kdtrain::kd_scale_launch(kd_dtype(grad, op), grad.data_ptr(), grad.numel(),
                                                   factor.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdtrain fused top-k KD loss kernels (see kdtrain/loss/kd_emulate.py for the interface)";
  m.def("kd_pass1", &kd_pass1, "Pass 1: row max / sum-exp / tail sum / gathers of a vocab shard",
        py::arg("logits"), py::arg("ids"), py::arg("labels"), py::arg("start"), py::arg("real"), py::arg("tau"),
        py::arg("dense"), py::arg("ce"));
  m.def("kd_pass2", &kd_pass2, "Pass 2: per-token loss terms and the gradient of the shard",
        py::arg("logits"), py::arg("ids"), py::arg("values"), py::arg("teacher_tail_lse"), py::arg("labels"),
        py::arg("m2"), py::arg("stats"), py::arg("row_weight"), py::arg("start"), py::arg("real"), py::arg("tau"),
        py::arg("divergence"), py::arg("beta"), py::arg("tail"), py::arg("has_tail"), py::arg("values_mode"),
        py::arg("kd_scale"), py::arg("alpha"), py::arg("log_floor"), py::arg("write_grad"));
  m.def("kd_fused_single", &kd_fused_single,
        "Single-read path (one vocab shard, sm_90+): pass 1 + pass 2 in one cluster kernel, same result as kd_pass2",
        py::arg("logits"), py::arg("ids"), py::arg("values"), py::arg("teacher_tail_lse"), py::arg("labels"),
        py::arg("row_weight"), py::arg("start"), py::arg("real"), py::arg("tau"), py::arg("divergence"),
        py::arg("beta"), py::arg("tail"), py::arg("has_tail"), py::arg("values_mode"), py::arg("kd_scale"),
        py::arg("alpha"), py::arg("log_floor"), py::arg("write_grad"));
  m.def("kd_single_supported", &kd_single_supported,
        "Whether kd_fused_single can run for these logits and k (sm_90+, the row fits a 16-CTA cluster)",
        py::arg("logits"), py::arg("k") = kdtrain::kKDMaxTopK);
  m.def("kd_single_info", &kd_single_info, "(cluster size, shared memory bytes per CTA, 'ok' or why not)",
        py::arg("logits"), py::arg("k") = kdtrain::kKDMaxTopK);
  m.def("kd_scale_grad_", &kd_scale_grad_, "grad *= factor in place (no pass when factor == 1)", py::arg("grad"),
        py::arg("factor"));
}

"""csrc/ without a GPU.

* Compile check: every .cu with nvcc for sm_80 and sm_90 (full compile to SASS, so a kernel that
  stops compiling fails here), every .cpp with the host compiler against torch's headers (syntax
  and templates). Skipped when nvcc is not installed.
* Host emulation: the kernel source, mechanically rewritten for the host compiler (one OS thread
  per CUDA thread, taken from a pool that later blocks and launches reuse, a barrier for
  __syncthreads whose waiters sleep on a futex, shared slots for warp shuffles, blocks run one
  after another), runs through the fused path's autograd.Function and is compared with the fp64
  reference and with the torch emulation of the kernel interface. It checks the kernels' indexing,
  row splitting, reductions and math on CPU; it cannot see GPU-only effects (memory ordering,
  fast-math intrinsics, timing). Needs a C++20 compiler and the CUDA headers.
* Host emulation of the single-read cluster kernel (kd_loss_single.cu, built with
  KD_HOST_EMULATION): each cluster's C blocks run concurrently as C x 256 OS threads, with
  one barrier per block (__syncthreads), one over the cluster (cluster.sync and the split
  arrive/wait), map_shared_rank as an offset into the owning block's shared-memory buffer and
  cp.async as a 16-byte copy. The cluster size is forced (1 to 16) on small rows, so slice
  boundaries, head/tail ownership, the DSMEM gathers and the cluster merge are exercised; outputs
  are compared with the torch emulation (pass 1 + pass 2). The host plan (driver queries,
  occupancy) and GPU memory ordering are not emulated: the GPU tests cover them.

torch's CPU wheel ships the ATen/c10 CUDA headers but not the build-generated
``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in is put on the include path when the
wheel lacks it (CUDA builds of torch have the real file)."""

import itertools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _cuda_include_dirs() -> list[str]:
    """The CUDA toolkit's include directory, as nvcc itself reports it."""
    out = subprocess.run([NVCC, "-v", "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    dirs = re.findall(r'INCLUDES="-I([^"]+?)"', out)
    dirs += [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs += [str(Path(NVCC).resolve().parents[1] / "include"), "/usr/local/cuda/include"]
    found = [d.strip() for d in dirs if os.path.isfile(os.path.join(d.strip(), "cuda_runtime_api.h"))]
    assert found, f"no cuda_runtime_api.h in {dirs}"
    return found[:1]


def _torch_includes(tmp_path: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    paths = list(include_paths())
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in paths):
        stub = tmp_path / "stub_include"
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        paths.append(str(stub))
    return paths


def _wait(procs, timeout=300):
    errors = []
    for name, proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            errors.append(f"{name}: timed out after {timeout} s")
            continue
        if proc.returncode != 0:
            errors.append(f"{name} failed ({proc.returncode}):\n{(out + err)[-6000:]}")
    assert not errors, "\n\n".join(errors)


def test_csrc_compiles(tmp_path):
    cu = sorted(CSRC.glob("*.cu"))
    cpp = sorted(CSRC.glob("*.cpp"))
    assert cu and cpp, "csrc/ should hold the kernel (.cu) and its bindings (.cpp)"
    cuda_inc = _cuda_include_dirs()
    procs = []
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what torch's extension builds pass

    for src in cu:  # both architectures in one nvcc call
        cmd = [NVCC, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), *COMMON_NVCC_FLAGS, "-std=c++17", "-O3",
               "--use_fast_math",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-Werror", "all-warnings", f"-I{CSRC}"]
        procs.append((" ".join(cmd), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler for the bindings")
    includes = [f"-I{p}" for p in _torch_includes(tmp_path) + cuda_inc + [sysconfig.get_paths()["include"], str(CSRC)]]
    for src in cpp:
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               *includes, str(src)]
        procs.append((" ".join(cmd), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    _wait(procs)
    for src in cu:
        obj = tmp_path / f"{src.stem}.o"
        assert obj.stat().st_size > 0
        cuobjdump = shutil.which("cuobjdump") or str(Path(NVCC).resolve().parent / "cuobjdump")
        if os.path.exists(cuobjdump):
            listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
            assert "sm_80" in listing and "sm_90" in listing, listing


def test_setup_builds_the_sources():
    """setup.py compiles every csrc/*.cu and *.cpp into kdtrain._C; the JIT fallback uses the same set."""
    text = (REPO / "setup.py").read_text()
    assert 'glob("*.cu")' in text and 'glob("*.cpp")' in text and '"kdtrain._C"' in text
    from kdtrain.loss import _ext

    assert _ext.CSRC == CSRC




# ----------------------------------------------------------------------------- host emulation


EMU_RUNTIME = r"""
// Host stand-ins shared by both harnesses: a barrier and a pool of worker threads.
// EmuBarrier: an arrival counter and a phase; waiters block on the phase (a futex through
// std::atomic::wait), so a block's threads sleep at __syncthreads instead of spinning.
struct EmuBarrier {
  explicit EmuBarrier(int n) : n_(n) {}
  int arrive() {
    const int phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      phase_.notify_all();
    }
    return phase;
  }
  void wait(int phase) { phase_.wait(phase, std::memory_order_acquire); }
  void arrive_and_wait() { wait(arrive()); }
  const int n_;
  std::atomic<int> count_{0}, phase_{0};
};

// EmuPool::run(n, fn) runs fn(0) .. fn(n - 1) on n distinct threads, all at once, and returns
// when every one has returned. Threads are created once and reused by later launches.
class EmuPool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    while ((int)workers_.size() < n) {
      const int id = (int)workers_.size();
      workers_.emplace_back([this, id] { loop(id); });
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &fn;
      n_ = n;
      pending_ = n;
      ++gen_;
    }
    start_.notify_all();
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [&] { return pending_ == 0; });
  }

 private:
  void loop(int id) {
    unsigned long seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(m_);
        start_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (id >= n_) continue;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lk(m_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
  std::vector<std::thread> workers_;  // never joined: they sleep in loop() until the process exits
  std::mutex m_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int n_ = 0, pending_ = 0;
  unsigned long gen_ = 0;
};
static EmuPool& emu_pool() { static EmuPool* pool = new EmuPool; return *pool; }
"""

HARNESS = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "emu_runtime.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 gridDim, blockDim;
alignas(64) static unsigned char emu_smem_buf[1 << 20];
static unsigned char* emu_dyn_smem = emu_smem_buf;
static EmuBarrier* emu_block_barrier = nullptr;
struct EmuWarp { EmuBarrier* bar; float slot[32]; };
static EmuWarp emu_warps[32];

static inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  emu_warps[w].slot[lane] = v;
  emu_warps[w].bar->arrive_and_wait();
  const float r = emu_warps[w].slot[lane ^ o];
  emu_warps[w].bar->arrive_and_wait();
  return r;
}
template <typename T> static inline T __ldg(const T* p) { return *p; }
static inline unsigned atomicOr(uint32_t* p, uint32_t v) { return std::atomic_ref<uint32_t>(*p).fetch_or(v); }
#define cudaGetLastError() cudaSuccess
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaDeviceGetAttribute(...) cudaErrorInvalidValue

static void emu_launch(unsigned grid, int threads, int smem, const std::function<void()>& body) {
  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(threads, 1, 1);
  if (smem > (int)sizeof(emu_smem_buf)) { fprintf(stderr, "dynamic shared memory %d too large\n", smem); abort(); }
  for (unsigned b = 0; b < grid; ++b) {
    std::memset(emu_smem_buf, 0xAB, smem);  // shared memory starts as garbage
    EmuBarrier bar(threads);
    emu_block_barrier = &bar;
    std::vector<std::unique_ptr<EmuBarrier>> warp_bars;
    for (int w = 0; w < threads / 32; ++w) {
      warp_bars.emplace_back(new EmuBarrier(32));
      emu_warps[w].bar = warp_bars.back().get();
    }
    emu_pool().run(threads, [&, b](int t) { threadIdx = make_uint3(t, 0, 0); blockIdx = make_uint3(b, 0, 0); body(); });
  }
}

#include "kernel_host.inc"

extern "C" {
int emu_pass1(int dt, const kdtrain::KDPass1Args* a) { return (int)kdtrain::kd_pass1_launch((kdtrain::KDDtype)dt, *a, nullptr); }
int emu_pass2(int dt, const kdtrain::KDPass2Args* a) { return (int)kdtrain::kd_pass2_launch((kdtrain::KDDtype)dt, *a, nullptr); }
int emu_scale(int dt, void* d, int64_t n, const float* f) { return (int)kdtrain::kd_scale_launch((kdtrain::KDDtype)dt, d, n, f, nullptr); }
int emu_sizeof(int which) { return which == 1 ? (int)sizeof(kdtrain::KDPass1Args) : (int)sizeof(kdtrain::KDPass2Args); }
}
"""


def host_kernel_source() -> str:
    """kd_loss_kernel.cu (with its local .cuh inlined) rewritten for the host compiler."""
    def inline(path: Path) -> str:
        text = path.read_text()
        return re.sub(r'#include "(\w+\.cuh)"', lambda m: inline(CSRC / m.group(1)).replace("#pragma once", ""), text)

    src = inline(CSRC / "kd_loss_kernel.cu")
    src = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = reinterpret_cast<\1*>(emu_dyn_smem);", src)
    src = src.replace("__shared__", "static")  # one block at a time: function statics are block-shared
    src = re.sub(r"__launch_bounds__\([^)]*\)", "", src)
    launches = re.findall(r"(\w+<\w+>)<<<([^,]+), ([^,]+), ([^,]+), ([^>]+)>>>\((.*?)\);", src, flags=re.S)
    assert len(launches) == 3, "expected the three kernel launches"
    for kern, grid, threads, smem, _stream, args in launches:
        src = src.replace(f"{kern}<<<{grid}, {threads}, {smem}, {_stream}>>>({args});",
                          f"emu_launch({grid}, {threads}, {smem}, [&] {{ {kern}({args}); }});")
    return src


def _host_compile(tmp_path: Path) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / "kernel_host.inc").write_text(host_kernel_source())
    (tmp_path / "emu_runtime.h").write_text(EMU_RUNTIME)
    (tmp_path / "harness.cpp").write_text(HARNESS)
    lib = tmp_path / "libkd_host.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(tmp_path / "harness.cpp"), "-o", str(lib),
           f"-I{CSRC}", f"-I{tmp_path}", *[f"-I{d}" for d in _cuda_include_dirs()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "has no member named 'wait'" in proc.stderr:
        pytest.skip("the host C++ library has no std::atomic<T>::wait (C++20)")
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-6000:]
    return lib


def test_kernel_logic_in_host_emulation(tmp_path):
    lib = _host_compile(tmp_path)
    proc = subprocess.run([sys.executable, __file__, str(lib)], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "host emulation: all checks passed" in proc.stdout, proc.stdout[-3000:]


def _host_checks(lib_path: str) -> None:
    """Child process (a hang or crash in the emulated kernels must not take pytest with it)."""
    import ctypes as C

    import torch

    from kdtrain.loss import KDLossConfig, kd_loss
    from kdtrain.loss.kd_checks import LOG_FLOOR
    from kdtrain.loss.kd_emulate import TorchKernels
    from kdtrain.loss.kd_fused import CudaKernels, _kd_loss_two_pass

    lib = C.CDLL(lib_path)

    class Pass1(C.Structure):
        _fields_ = [("logits", C.c_void_p), ("rows", C.c_int64), ("vl", C.c_int64), ("start", C.c_int64),
                    ("real", C.c_int64), ("ids", C.c_void_p), ("k", C.c_int), ("labels", C.c_void_p),
                    ("tau", C.c_float), ("dense", C.c_bool), ("ce", C.c_bool), ("m2", C.c_void_p),
                    ("stats", C.c_void_p)]

    class Pass2(C.Structure):
        _fields_ = [("logits", C.c_void_p), ("rows", C.c_int64), ("vl", C.c_int64), ("start", C.c_int64),
                    ("real", C.c_int64), ("ids", C.c_void_p), ("k", C.c_int), ("values", C.c_void_p),
                    ("teacher_lse", C.c_void_p), ("labels", C.c_void_p), ("m2", C.c_void_p), ("stats", C.c_void_p),
                    ("row_weight", C.c_void_p), ("tau", C.c_float), ("beta", C.c_float), ("kd_scale", C.c_float),
                    ("alpha", C.c_float), ("log_floor", C.c_float), ("divergence", C.c_int),
                    ("values_mode", C.c_int), ("tail", C.c_bool), ("has_tail", C.c_bool), ("grad", C.c_void_p),
                    ("terms", C.c_void_p)]

    assert lib.emu_sizeof(1) == C.sizeof(Pass1) and lib.emu_sizeof(2) == C.sizeof(Pass2), "kd_loss.h changed"
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    ptr = lambda t: None if t is None else t.data_ptr()

    class HostModule:  # the bindings' interface, on CPU tensors
        def kd_pass1(self, logits, ids, labels, start, real, tau, dense, ce):
            rows, k = ids.shape
            m2, stats = torch.empty(rows), torch.empty(rows, 4 + k)
            a = Pass1(ptr(logits), rows, logits.shape[1], start, real, ptr(ids), k, ptr(labels), tau, dense, ce,
                      ptr(m2), ptr(stats))
            assert lib.emu_pass1(codes[logits.dtype], C.byref(a)) == 0
            return m2, stats

        def kd_pass2(self, logits, ids, values, lse, labels, m2, stats, rw, start, real, tau, div, beta, tail,
                     has_tail, mode, kd_scale, alpha, floor, write_grad):
            rows, k = ids.shape
            grad = torch.empty_like(logits) if write_grad else torch.empty(0)
            terms = torch.empty(rows, 2)
            a = Pass2(ptr(logits), rows, logits.shape[1], start, real, ptr(ids), k, ptr(values),
                      ptr(lse) if mode == 1 else None, ptr(labels), ptr(m2), ptr(stats), ptr(rw), tau, beta, kd_scale,
                      alpha, floor, div, mode, tail, has_tail, ptr(grad) if write_grad else None, ptr(terms))
            assert lib.emu_pass2(codes[logits.dtype], C.byref(a)) == 0
            return grad, terms

        def kd_scale_grad_(self, grad, factor):
            assert lib.emu_scale(codes[grad.dtype], C.c_void_p(grad.data_ptr()), grad.numel(),
                                 C.c_void_p(factor.data_ptr())) == 0

    backend = CudaKernels(HostModule())
    tol = {torch.float32: (1e-5, 1e-5, 1e-5), torch.bfloat16: (1e-4, 2.0 ** -7, 1e-3),
           torch.float16: (1e-4, 2.0 ** -9, 1e-4)}
    failures = []

    def data(S, V, Vl, k, dtype, seed, tau, mode="lse", misaligned=False):
        g = torch.Generator().manual_seed(seed)
        student = (3 * torch.randn(S, 1, Vl, generator=g)).to(dtype)
        if misaligned:  # storage offset of one element: rows and base not 16-byte aligned
            student = torch.cat([torch.zeros(1, dtype=dtype), student.flatten()])[1:].view(S, 1, Vl)
        teacher = 3 * torch.randn(S, 1, V, generator=g)
        vals, ids = torch.topk(teacher, k, dim=-1)
        lse = torch.logsumexp(teacher / tau, -1)
        if mode == "logprobs":
            vals = vals / tau - lse[..., None]
        labels = torch.randint(0, V, (S, 1), generator=g)
        mask = (torch.rand(S, 1, generator=g) > 0.2).float()
        mask[-1] = 1.0  # at least one valid token
        if S > 2:
            labels[0, 0] = -100
        return student, ids.int(), vals, (lse if mode == "lse" else None), labels, mask

    def run(host, student, ids, vals, lse, labels, mask, cfg, vocab, scale):
        if not host:
            student, vals = student.double(), vals.double()
            lse = lse.double() if lse is not None else None
        x = student.clone().requires_grad_()
        kw = dict(vocab_size=vocab, config=cfg, teacher_lse_SB=lse, labels_SB=labels, loss_mask_SB=mask,
                  num_tokens=None, validate=True)
        loss, rep = (_kd_loss_two_pass(x, ids, vals, backend=backend, tp_group=None, **kw) if host
                     else kd_loss(x, ids, vals, impl="reference", **kw))
        (scale * loss).backward()
        return loss.detach(), x.grad

    def check(name, cfg, dtype, shape, mode="lse", misaligned=False, scale=2.0):
        S, V, Vl, k = shape
        d = data(S, V, Vl, k, dtype, seed=len(failures) + S + k, tau=cfg.tau, mode=mode, misaligned=misaligned)
        (la, ga), (lb, gb) = run(True, *d, cfg, V, scale), run(False, *d, cfg, V, scale)
        lr, gr, ga_tol = tol[dtype]
        diff = (ga.double() - gb).abs()
        ok = (abs(la.item() - lb.item()) <= lr * abs(lb.item()) and ga.dtype == dtype
              and bool((diff <= gr * gb.abs() + ga_tol * gb.abs().max()).all()))
        print(f"{name:44s} {str(dtype)[6:]:9s} loss {la.item():.6g} vs {lb.item():.6g}  grad err "
              f"{diff.max().item():.2e} of max {gb.abs().max().item():.2e}  {'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            failures.append(name)

    divs = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 1.0)]
    for (div, beta), tail, dtype in itertools.product(divs, ["tail", "renorm"], [torch.float32, torch.bfloat16]):
        cfg = KDLossConfig(divergence=div, beta=beta, tail=tail, tau=1.5, scale_by_tau_sq=True, alpha=0.2)
        check(f"{div}(beta={beta}) {tail}", cfg, dtype, (4, 1271, 1280, 50))
    for mode, dtype in itertools.product(["lse", "logits", "logprobs"], [torch.float32, torch.float16]):
        cfg = KDLossConfig(divergence="jsd", beta=0.3, values_are_logprobs=mode == "logprobs", alpha=0.1)
        check(f"odd 3x1271 k=401 values={mode}", cfg, dtype, (3, 1271, 1271, 401), mode=mode)
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.1, tau=0.8)
    check("misaligned base, tau=0.8", cfg, torch.bfloat16, (3, 999, 1001, 33), misaligned=True)
    check("k=1024", cfg, torch.bfloat16, (2, 3001, 3008, 1024))
    check("k=1, grad_output=1", cfg, torch.float32, (2, 301, 304, 1), scale=1.0)
    check("k=V", KDLossConfig(divergence="reverse_kl"), torch.float32, (2, 129, 129, 129))
    check("K bitmap above 48 KiB", cfg, torch.bfloat16, (1, 400_003, 400_008, 16))

    # The raw interface against the torch emulation: shards without real columns, renorm without
    # the dense pass, masked rows, loss-only calls, the scaling kernel.
    emu = TorchKernels()
    g = torch.Generator().manual_seed(0)
    for trial, (Vl, tp_rank, real_cut, dense, ce) in enumerate(itertools.product(
            [333], [0, 2], [0, 5], [True, False], [True, False])):
        V, rows, k, tau = 2 * Vl + Vl // 2, 3, 5, 0.7
        start = tp_rank * Vl
        real = max(0, min(Vl, V - start) - real_cut)
        logits = (3 * torch.randn(rows, Vl, generator=g)).bfloat16()
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(rows)]).int()
        labels = torch.randint(0, V, (rows,), generator=g)
        (m_h, s_h), (m_e, s_e) = [b.pass1(logits, ids, labels if ce else None, start, real, tau, dense, ce)
                                  for b in (backend, emu)]
        if not (torch.allclose(m_h, m_e.float(), rtol=1e-6, equal_nan=True)
                and torch.allclose(s_h, s_e, rtol=2e-6, atol=1e-30)):
            failures.append(f"pass1 trial {trial}")
        if real == 0 or (not dense and ce):
            continue
        vals = torch.sort(3 * torch.randn(rows, k, generator=g), -1, descending=True).values
        rw = torch.tensor([0.0, 0.3, 1.7])
        for write_grad, div, tail in [(True, trial % 3, dense), (True, (trial + 1) % 3, False), (False, 2, dense)]:
            args = (logits, ids, vals, None, labels if ce else None, m_h, s_h, rw, start, real, tau, div, 0.4, tail,
                    k < V, 2, 1.5, 0.3 if ce else 0.0, LOG_FLOOR, write_grad)
            (g_h, t_h), (g_e, t_e) = backend.pass2(*args), emu.pass2(*args)
            if not torch.allclose(t_h, t_e, rtol=1e-5, atol=1e-6) or (write_grad and not torch.allclose(
                    g_h.float(), g_e.float(), rtol=2 ** -7, atol=1e-3 * g_e.float().abs().max().item())):
                failures.append(f"pass2 trial {trial} div {div} tail {tail} grad {write_grad}")
            if write_grad and g_h[0].abs().max() != 0:
                failures.append(f"pass2 trial {trial}: masked row not zero")
    for dtype, f in itertools.product([torch.float32, torch.bfloat16, torch.float16], [1.0, 0.37]):
        grad = torch.randn(1003, generator=g).to(dtype)[1:]  # misaligned base: scalar path
        for t in (grad, torch.randn(4, 1001, generator=g).to(dtype)):
            expect = t.clone() if f == 1.0 else (t.float() * f).to(dtype)
            backend.scale_grad_(t, torch.tensor([f]))
            if not torch.equal(t, expect):
                failures.append(f"scale {dtype} {f}")
    assert not failures, failures
    print("host emulation: all checks passed")


# ------------------------------------------------------------- host emulation: cluster kernel

CLUSTER_HARNESS = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "emu_runtime.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 gridDim, blockDim;
struct EmuBlock {
  std::vector<unsigned char> smem;
  std::unique_ptr<EmuBarrier> bar;
  std::unique_ptr<EmuBarrier> warp_bar[32];
  float slot[32][32];
};
static std::vector<EmuBlock> emu_blocks;  // the blocks of the running cluster
static std::unique_ptr<EmuBarrier> emu_cluster_bar;
static int emu_cluster = 1;
thread_local EmuBlock* emu_blk;
thread_local unsigned char* emu_dyn_smem;
thread_local int emu_token;  // the cluster barrier's phase at cluster_arrive

static inline void __syncthreads() { emu_blk->bar->arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  emu_blk->slot[w][lane] = v;
  emu_blk->warp_bar[w]->arrive_and_wait();
  const float r = emu_blk->slot[w][lane ^ o];
  emu_blk->warp_bar[w]->arrive_and_wait();
  return r;
}
static inline unsigned atomicOr(uint32_t* p, uint32_t v) { return std::atomic_ref<uint32_t>(*p).fetch_or(v); }
namespace kdtrain { namespace kd {
static inline unsigned cluster_rank() { return blockIdx.x % emu_cluster; }
static inline unsigned cluster_size() { return emu_cluster; }
static inline void cluster_sync() { emu_cluster_bar->arrive_and_wait(); }
static inline void cluster_arrive() { emu_token = emu_cluster_bar->arrive(); }
static inline void cluster_wait() { emu_cluster_bar->wait(emu_token); }
template <typename P> static inline P* cluster_map(P* p, unsigned rank) {
  const auto off = reinterpret_cast<unsigned char*>(p) - emu_dyn_smem;
  return reinterpret_cast<P*>(emu_blocks[rank].smem.data() + off);
}
static inline void cp_async16(void* s, const void* g) { std::memcpy(s, g, 16); }
static inline void cp_async_wait_all() {}
}}
#define cudaGetLastError() cudaSuccess
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaDeviceGetAttribute(...) cudaErrorInvalidValue
#define cudaFuncGetAttributes(...) cudaErrorInvalidValue
#define cudaOccupancyMaxActiveClusters(...) cudaErrorInvalidValue

static cudaError_t emu_cluster_launch(unsigned grid, int cluster, int threads, int smem,
                                      const std::function<void()>& body) {
  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(threads, 1, 1);
  emu_cluster = cluster;
  for (unsigned c0 = 0; c0 < grid; c0 += cluster) {
    emu_blocks.clear();
    emu_blocks.resize(cluster);
    for (auto& b : emu_blocks) {
      b.smem.assign(smem + 16, 0xAB);  // shared memory starts as garbage
      b.bar.reset(new EmuBarrier(threads));
      for (int w = 0; w < threads / 32; ++w) b.warp_bar[w].reset(new EmuBarrier(32));
    }
    emu_cluster_bar.reset(new EmuBarrier(cluster * threads));
    emu_pool().run(cluster * threads, [&, c0](int i) {
      const int q = i / threads, t = i % threads;
      threadIdx = make_uint3(t, 0, 0);
      blockIdx = make_uint3(c0 + q, 0, 0);
      emu_blk = &emu_blocks[q];
      emu_dyn_smem = emu_blocks[q].smem.data();
      body();
    });
  }
  return cudaSuccess;
}

#include "single_host.inc"

int kdtrain::kd_max_dynamic_smem(int) { return 227 * 1024; }

extern "C" {
int emu_single(int dt, const kdtrain::KDPass2Args* a, int cluster) {
  kdtrain::KDSinglePlan p{0, 0, 0, 0, nullptr};
  kdtrain::plan_layout(p, a->vl, a->k, dt == 0 ? 4 : 2, cluster);
  return (int)kdtrain::kd_single_launch((kdtrain::KDDtype)dt, *a, p, nullptr);
}
int emu_single_smem(int dt, int64_t vl, int k, int cluster) {
  kdtrain::KDSinglePlan p{0, 0, 0, 0, nullptr};
  kdtrain::plan_layout(p, vl, k, dt == 0 ? 4 : 2, cluster);
  return p.smem;
}
}
"""


def host_single_source() -> str:
    """kd_loss_single.cu (with its local .cuh inlined) rewritten for the host compiler."""
    def inline(path: Path) -> str:
        text = path.read_text()
        return re.sub(r'#include "(\w+\.cuh)"', lambda m: inline(CSRC / m.group(1)).replace("#pragma once", ""), text)

    src = "#define KD_HOST_EMULATION 1\n" + inline(CSRC / "kd_loss_single.cu")
    src = re.sub(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];", r"unsigned char* \1 = emu_dyn_smem;",
                 src)
    src = re.sub(r"__launch_bounds__\([^)]*\)", "", src)
    launch = re.findall(r"return cudaLaunchKernelEx\(&cfg, (\w+<T>), (.*?)\);", src, flags=re.S)
    assert len(launch) == 1, "expected the one cluster launch"
    kern, args = launch[0]
    src = src.replace(f"return cudaLaunchKernelEx(&cfg, {kern}, {args});",
                      f"return emu_cluster_launch(cfg.gridDim.x, p.cluster, kThreads, p.smem, "
                      f"[&] {{ {kern}({args}); }});")
    return src


def test_single_read_kernel_in_host_emulation(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / "single_host.inc").write_text(host_single_source())
    (tmp_path / "emu_runtime.h").write_text(EMU_RUNTIME)
    (tmp_path / "harness.cpp").write_text(CLUSTER_HARNESS)
    lib = tmp_path / "libkd_single_host.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(tmp_path / "harness.cpp"), "-o", str(lib),
           f"-I{CSRC}", f"-I{tmp_path}", *[f"-I{d}" for d in _cuda_include_dirs()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "has no member named 'wait'" in proc.stderr:
        pytest.skip("the host C++ library has no std::atomic<T>::wait (C++20)")
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-6000:]
    proc = subprocess.run([sys.executable, __file__, "--single", str(lib)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "single-read host emulation: all checks passed" in proc.stdout, proc.stdout[-3000:]


def _single_checks(lib_path: str) -> None:
    """Child process: the cluster kernel (forced cluster sizes) against the torch emulation."""
    import ctypes as C

    import torch

    from kdtrain.loss.kd_checks import LOG_FLOOR
    from kdtrain.loss.kd_emulate import TorchKernels

    lib = C.CDLL(lib_path)

    class Pass2(C.Structure):
        _fields_ = [("logits", C.c_void_p), ("rows", C.c_int64), ("vl", C.c_int64), ("start", C.c_int64),
                    ("real", C.c_int64), ("ids", C.c_void_p), ("k", C.c_int), ("values", C.c_void_p),
                    ("teacher_lse", C.c_void_p), ("labels", C.c_void_p), ("m2", C.c_void_p), ("stats", C.c_void_p),
                    ("row_weight", C.c_void_p), ("tau", C.c_float), ("beta", C.c_float), ("kd_scale", C.c_float),
                    ("alpha", C.c_float), ("log_floor", C.c_float), ("divergence", C.c_int),
                    ("values_mode", C.c_int), ("tail", C.c_bool), ("has_tail", C.c_bool), ("grad", C.c_void_p),
                    ("terms", C.c_void_p)]

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    ptr = lambda t: None if t is None else t.data_ptr()
    emu = TorchKernels()
    failures = []
    g = torch.Generator().manual_seed(0)
    cases = [  # (dtype, vl, real, k, cluster, offset elements, divergence, tail, values_mode, alpha, tau)
        (torch.bfloat16, 1280, 1271, 50, 4, 0, 2, True, 1, 0.2, 1.5),
        (torch.bfloat16, 1001, 999, 33, 8, 1, 2, True, 1, 0.1, 0.8),    # misaligned rows and base
        (torch.float32, 777, 777, 777, 2, 0, 1, True, 1, 0.0, 1.0),     # k = V: no tail
        (torch.float16, 1271, 1271, 401, 16, 3, 0, True, 0, 0.1, 1.0),  # log-probs, C = 16
        (torch.bfloat16, 300, 290, 20, 16, 0, 2, False, 2, 0.0, 0.7),   # renorm without CE, empty ranks
        (torch.float32, 5, 5, 3, 4, 1, 2, True, 2, 0.3, 1.2),           # row shorter than a vector
        (torch.bfloat16, 4099, 4099, 64, 1, 5, 2, True, 1, 0.2, 1.0),   # one CTA
    ]
    for n, (dtype, vl, real, k, cluster, off, div, tail, mode, alpha, tau) in enumerate(cases):
        rows = 3
        buf = (3 * torch.randn(rows * vl + off, generator=g)).to(dtype)
        logits = buf[off:].view(rows, vl)  # storage offset: base misaligned by `off` elements
        perms = [torch.randperm(real, generator=g) for _ in range(rows)]
        if k >= 2 and real > 1:  # row 1: the row's first and last columns are in K
            ends = torch.tensor([0, real - 1])
            perms[1] = torch.cat([ends, perms[1][(perms[1] != 0) & (perms[1] != real - 1)]])
        ids = torch.stack([q[:k] for q in perms]).int()
        vals = torch.sort(3 * torch.randn(rows, k, generator=g), -1, descending=True).values
        lse = torch.logsumexp(vals, -1) + 0.5
        if mode == 0:
            vals = vals / tau - (torch.logsumexp(vals / tau, -1) + 0.3)[:, None]
        labels = torch.randint(0, real, (rows,), generator=g)
        labels[2] = ids[2, 0]  # a label inside K
        rw = torch.tensor([0.0, 0.3, 1.7])
        for write_grad in (True, False):
            grad = torch.empty_like(logits) if write_grad else torch.empty(0)
            terms = torch.empty(rows, 2)
            lab = labels if alpha > 0 else None
            a = Pass2(ptr(logits), rows, vl, 0, real, ptr(ids), k, ptr(vals), ptr(lse) if mode == 1 else None,
                      ptr(lab), None, None, ptr(rw), tau, 0.4, 1.5, alpha, LOG_FLOOR, div, mode, tail, k < real,
                      ptr(grad) if write_grad else None, ptr(terms))
            rc = lib.emu_single(codes[dtype], C.byref(a), cluster)
            g_e, t_e = emu.fused_single(logits, ids, vals, lse if mode == 1 else None, lab, rw, 0, real, tau, div,
                                        0.4, tail, k < real, mode, 1.5, alpha, LOG_FLOOR, write_grad)
            ok = rc == 0 and torch.allclose(terms, t_e.float(), rtol=1e-5, atol=1e-6)
            if write_grad:
                tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}[dtype]
                ok = ok and torch.allclose(grad.float(), g_e.float(), rtol=tol,
                                           atol=1e-3 * g_e.float().abs().max().item())
                ok = ok and grad[0].abs().max() == 0 and (vl == real or grad[:, real:].abs().max() == 0)
            print(f"case {n} {str(dtype)[6:]:8s} vl={vl} k={k} cluster={cluster} grad={write_grad} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                failures.append(f"case {n} grad={write_grad}")
    if lib.emu_single_smem(2, 128256, 64, 4) > 100 * 1024 or lib.emu_single_smem(2, 128256, 64, 2) <= 100 * 1024:
        failures.append("bf16 x 128256 should need a 4-CTA cluster")
    assert not failures, failures
    print("single-read host emulation: all checks passed")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "--single":
        _single_checks(sys.argv[2])
    else:
        _host_checks(sys.argv[1])

"""The host emulation of csrc/'s kernels, shared by tests/test_csrc_emulation.py: runtime stand-ins
(a thread pool, a futex barrier, the cluster primitives), the two harnesses that expose the kernels
through C entry points, and the mechanical rewrite of each .cu for the host compiler.
tests/test_csrc_emulation.py says what the emulation covers and what it cannot see."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc")


def cuda_include_dirs() -> list[str]:
    """The CUDA toolkit's include directory, as nvcc itself reports it."""
    out = subprocess.run([NVCC, "-v", "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    dirs = re.findall(r'INCLUDES="-I([^"]+?)"', out)
    dirs += [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs += [str(Path(NVCC).resolve().parents[1] / "include"), "/usr/local/cuda/include"]
    found = [d.strip() for d in dirs if os.path.isfile(os.path.join(d.strip(), "cuda_runtime_api.h"))]
    assert found, f"no cuda_runtime_api.h in {dirs}"
    return found[:1]



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



def host_compile(tmp_path: Path, kernel: str, harness: str, name: str) -> Path:
    """Build ``harness`` (which includes ``<name>.inc``, the rewritten ``kernel``) into lib<name>.so;
    skips when the host has no C++20 compiler or library."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / f"{name}.inc").write_text(kernel)
    (tmp_path / "emu_runtime.h").write_text(EMU_RUNTIME)
    (tmp_path / "harness.cpp").write_text(harness)
    lib = tmp_path / f"lib{name}.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(tmp_path / "harness.cpp"), "-o", str(lib),
           f"-I{CSRC}", f"-I{tmp_path}", *[f"-I{d}" for d in cuda_include_dirs()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "has no member named 'wait'" in proc.stderr:
        pytest.skip("the host C++ library has no std::atomic<T>::wait (C++20)")
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stderr[-6000:]
    return lib

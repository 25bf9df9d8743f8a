"""csrc/'s kernels run on the host, without a GPU (the emulation itself is in tests/csrc_host.py).

* The two-pass kernels (kd_loss_kernel.cu): the source, mechanically rewritten for the host
  compiler (one OS thread per CUDA thread, taken from a pool that later blocks and launches reuse,
  a barrier for __syncthreads whose waiters sleep on a futex, shared slots for warp shuffles,
  blocks run one after another), runs through the fused path's autograd.Function and is compared
  with the fp64 reference and with the torch emulation of the kernel interface. It checks the
  kernels' indexing, row splitting, reductions and math on CPU; it cannot see GPU-only effects
  (memory ordering, fast-math intrinsics, timing).
* The single-read cluster kernel (kd_loss_single.cu, built with KD_HOST_EMULATION): each
  cluster's C blocks run concurrently as C x 256 OS threads, with one barrier per block
  (__syncthreads), one over the cluster (cluster.sync and the split arrive/wait),
  map_shared_rank as an offset into the owning block's shared-memory buffer and cp.async as a
  16-byte copy. The cluster size is forced (1 to 16) on small rows, so slice boundaries,
  head/tail ownership, the DSMEM gathers and the cluster merge are exercised; outputs are compared
  with the torch emulation (pass 1 + pass 2). The host plan (driver queries, occupancy) and GPU
  memory ordering are not emulated: the GPU tests cover them.

Both need a C++20 compiler and the CUDA headers (found through nvcc: skipped without it). The
checks run in a child process: a hang or crash in an emulated kernel must not take pytest with it."""

import ctypes as C
import itertools
import os
import subprocess
import sys

import pytest
from csrc_host import (CLUSTER_HARNESS, HARNESS, NVCC, REPO, host_compile, host_kernel_source,
                       host_single_source)

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (it locates the CUDA headers)")


class Pass1(C.Structure):
    """kdtrain::KDPass1Args (csrc/kd_loss.h), field for field."""
    _fields_ = [("logits", C.c_void_p), ("rows", C.c_int64), ("vl", C.c_int64), ("start", C.c_int64),
                ("real", C.c_int64), ("ids", C.c_void_p), ("k", C.c_int), ("labels", C.c_void_p),
                ("tau", C.c_float), ("dense", C.c_bool), ("ce", C.c_bool), ("m2", C.c_void_p),
                ("stats", C.c_void_p)]


class Pass2(C.Structure):
    """kdtrain::KDPass2Args (csrc/kd_loss.h), field for field."""
    _fields_ = [("logits", C.c_void_p), ("rows", C.c_int64), ("vl", C.c_int64), ("start", C.c_int64),
                ("real", C.c_int64), ("ids", C.c_void_p), ("k", C.c_int), ("values", C.c_void_p),
                ("teacher_tail_lse", C.c_void_p), ("labels", C.c_void_p), ("m2", C.c_void_p),
                ("stats", C.c_void_p), ("row_weight", C.c_void_p), ("tau", C.c_float), ("beta", C.c_float),
                ("kd_scale", C.c_float), ("alpha", C.c_float), ("log_floor", C.c_float), ("divergence", C.c_int),
                ("values_mode", C.c_int), ("tail", C.c_bool), ("has_tail", C.c_bool), ("grad", C.c_void_p),
                ("terms", C.c_void_p)]


def _run_checks(*args: str, timeout: int) -> str:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return proc.stdout


def test_kernel_logic_in_host_emulation(tmp_path):
    lib = host_compile(tmp_path, host_kernel_source(), HARNESS, "kernel_host")
    out = _run_checks(str(lib), timeout=300)
    assert "host emulation: all checks passed" in out, out[-3000:]


def test_single_read_kernel_in_host_emulation(tmp_path):
    lib = host_compile(tmp_path, host_single_source(), CLUSTER_HARNESS, "single_host")
    out = _run_checks("--single", str(lib), timeout=600)
    assert "single-read host emulation: all checks passed" in out, out[-3000:]


def _host_checks(lib_path: str) -> None:
    """Child process (a hang or crash in the emulated kernels must not take pytest with it)."""
    import torch

    from kdtrain.loss import KDLossConfig, kd_loss
    from kdtrain.loss.kd_checks import LOG_FLOOR
    from kdtrain.loss.kd_emulate import TorchKernels
    from kdtrain.loss.kd_fused import CudaKernels, _kd_loss_two_pass

    lib = C.CDLL(lib_path)

    assert lib.emu_sizeof(1) == C.sizeof(Pass1) and lib.emu_sizeof(2) == C.sizeof(Pass2), "kd_loss.h changed"
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    ptr = lambda t: None if t is None else t.data_ptr()

    class HostModule:  # the bindings' interface, on CPU tensors
        def kd_pass1(self, logits, ids, labels, start, real, tau, dense, ce):
            rows, k = ids.shape
            m2, stats = torch.empty(rows, 2), torch.empty(rows, 4 + k)
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

    def data(S, V, Vl, k, dtype, seed, tau, mode="tail_lse", misaligned=False, collapsed=False):
        g = torch.Generator().manual_seed(seed)
        student = (3 * torch.randn(S, 1, Vl, generator=g)).to(dtype)
        if misaligned:  # storage offset of one element: rows and base not 16-byte aligned
            student = torch.cat([torch.zeros(1, dtype=dtype), student.flatten()])[1:].view(S, 1, Vl)
        teacher = 3 * torch.randn(S, 1, V, generator=g)
        vals, ids = torch.topk(teacher, k, dim=-1)
        if collapsed:  # the student's tail 100 below its top-k, past fp32's range relative to the top
            student = (student.float() / 3).scatter(-1, ids, 100.0).to(dtype)
        tail = torch.logsumexp((teacher / tau).scatter(-1, ids, float("-inf")), -1)
        if mode == "logprobs":
            vals = vals / tau - torch.logsumexp(teacher / tau, -1)[..., None]
        labels = torch.randint(0, V, (S, 1), generator=g)
        mask = (torch.rand(S, 1, generator=g) > 0.2).float()
        mask[-1] = 1.0  # at least one valid token
        if S > 2:
            labels[0, 0] = -100
        return student, ids.int(), vals, (tail if mode == "tail_lse" else None), labels, mask

    def run(host, student, ids, vals, lse, labels, mask, cfg, vocab, scale):
        if not host:
            student, vals = student.double(), vals.double()
            lse = lse.double() if lse is not None else None
        x = student.clone().requires_grad_()
        kw = dict(vocab_size=vocab, config=cfg, teacher_tail_lse_SB=lse, labels_SB=labels, loss_mask_SB=mask,
                  num_tokens=None, validate=True)
        loss, rep = (_kd_loss_two_pass(x, ids, vals, backend=backend, tp_group=None, **kw) if host
                     else kd_loss(x, ids, vals, impl="reference", **kw))
        (scale * loss).backward()
        return loss.detach(), x.grad

    def check(name, cfg, dtype, shape, mode="tail_lse", misaligned=False, scale=2.0, collapsed=False):
        S, V, Vl, k = shape
        d = data(S, V, Vl, k, dtype, seed=len(failures) + S + k, tau=cfg.tau, mode=mode, misaligned=misaligned,
                 collapsed=collapsed)
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
    for mode, dtype in itertools.product(["tail_lse", "logits", "logprobs"], [torch.float32, torch.float16]):
        cfg = KDLossConfig(divergence="jsd", beta=0.3, values_are_logprobs=mode == "logprobs", alpha=0.1)
        check(f"odd 3x1271 k=401 values={mode}", cfg, dtype, (3, 1271, 1271, 401), mode=mode)
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.1, tau=0.8)
    check("misaligned base, tau=0.8", cfg, torch.bfloat16, (3, 999, 1001, 33), misaligned=True)
    check("k=1024", cfg, torch.bfloat16, (2, 3001, 3008, 1024))
    check("k=1, grad_output=1", cfg, torch.float32, (2, 301, 304, 1), scale=1.0)
    check("k=V", KDLossConfig(divergence="reverse_kl"), torch.float32, (2, 129, 129, 129))
    check("K bitmap above 48 KiB", cfg, torch.bfloat16, (1, 400_003, 400_008, 16))
    check("jsd beta=1e-6 (log1p/expm1 form)", KDLossConfig(divergence="jsd", beta=1e-6), torch.float32,
          (3, 1271, 1280, 40))
    for div, tau in (("forward_kl", 0.5), ("jsd", 1.0)):  # tau 1: one exponential for the KD and CE parts
        check(f"collapsed student {div} tau={tau}", KDLossConfig(divergence=div, tau=tau, alpha=0.1),
              torch.float32, (3, 1271, 1280, 40), collapsed=True)

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


def _single_checks(lib_path: str) -> None:
    """Child process: the cluster kernel (forced cluster sizes) against the torch emulation."""
    import torch

    from kdtrain.loss.kd_checks import LOG_FLOOR
    from kdtrain.loss.kd_emulate import TorchKernels

    lib = C.CDLL(lib_path)

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    ptr = lambda t: None if t is None else t.data_ptr()
    emu = TorchKernels()
    failures = []
    g = torch.Generator().manual_seed(0)
    cases = [  # (dtype, vl, real, k, cluster, offset elements, divergence, tail, values_mode, alpha, tau[, collapsed])
        (torch.bfloat16, 1280, 1271, 50, 4, 0, 2, True, 1, 0.2, 1.5),
        (torch.bfloat16, 1001, 999, 33, 8, 1, 2, True, 1, 0.1, 0.8),    # misaligned rows and base
        (torch.float32, 777, 777, 777, 2, 0, 1, True, 1, 0.0, 1.0),     # k = V: no tail
        (torch.float16, 1271, 1271, 401, 16, 3, 0, True, 0, 0.1, 1.0),  # log-probs, C = 16
        (torch.bfloat16, 300, 290, 20, 16, 0, 2, False, 2, 0.0, 0.7),   # renorm without CE, empty ranks
        (torch.float32, 5, 5, 3, 4, 1, 2, True, 2, 0.3, 1.2),           # row shorter than a vector
        (torch.bfloat16, 4099, 4099, 64, 1, 5, 2, True, 1, 0.2, 1.0),   # one CTA
        (torch.float32, 1280, 1271, 50, 4, 0, 0, True, 1, 0.1, 0.5, True),  # a tail 200 nats below its top-k
        (torch.bfloat16, 999, 999, 16, 2, 1, 2, True, 1, 0.2, 1.0, True),   # the same at tau 1 (AB folded)
    ]
    for n, (dtype, vl, real, k, cluster, off, div, tail, mode, alpha, tau, *collapsed) in enumerate(cases):
        rows = 3
        buf = (3 * torch.randn(rows * vl + off, generator=g)).to(dtype)
        logits = buf[off:].view(rows, vl)  # storage offset: base misaligned by `off` elements
        perms = [torch.randperm(real, generator=g) for _ in range(rows)]
        if k >= 2 and real > 1:  # row 1: the row's first and last columns are in K
            ends = torch.tensor([0, real - 1])
            perms[1] = torch.cat([ends, perms[1][(perms[1] != 0) & (perms[1] != real - 1)]])
        ids = torch.stack([q[:k] for q in perms]).int()
        if collapsed:  # the student's logits outside K 100 below those in K
            logits.copy_((logits.float() / 3).scatter(-1, ids.long(), 100.0).to(dtype))
        vals = torch.sort(3 * torch.randn(rows, k, generator=g), -1, descending=True).values
        tail_lse = torch.logsumexp(vals, -1) + 0.5  # some mass outside K
        if mode == 0:
            vals = vals / tau - (torch.logsumexp(vals / tau, -1) + 0.3)[:, None]
        labels = torch.randint(0, real, (rows,), generator=g)
        labels[2] = ids[2, 0]  # a label inside K
        rw = torch.tensor([0.0, 0.3, 1.7])
        for write_grad in (True, False):
            grad = torch.empty_like(logits) if write_grad else torch.empty(0)
            terms = torch.empty(rows, 2)
            lab = labels if alpha > 0 else None
            a = Pass2(ptr(logits), rows, vl, 0, real, ptr(ids), k, ptr(vals), ptr(tail_lse) if mode == 1 else None,
                      ptr(lab), None, None, ptr(rw), tau, 0.4, 1.5, alpha, LOG_FLOOR, div, mode, tail, k < real,
                      ptr(grad) if write_grad else None, ptr(terms))
            rc = lib.emu_single(codes[dtype], C.byref(a), cluster)
            g_e, t_e = emu.fused_single(logits, ids, vals, tail_lse if mode == 1 else None, lab, rw, 0, real, tau, div,
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

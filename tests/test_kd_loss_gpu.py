"""The fused CUDA kernels against the reference on a GPU (skipped without CUDA).

    pytest -q -m gpu tests/test_kd_loss_gpu.py

Tolerances (kernel, fp32 arithmetic, against the reference in fp64 on the same rounded inputs):
    fp32 logits : loss rel 1e-5;  grad |d| <= 1e-5 * max|grad| + 1e-5 * |grad|
    bf16 logits : loss rel 1e-4;  grad |d| <= 2^-7 * |grad| + 1e-3 * max|grad|  (the kernel stores
                  its gradient in bf16: a rounding of 2^-8 relative at most)
    fp16 logits : loss rel 1e-4;  grad |d| <= 2^-9 * |grad| + 1e-4 * max|grad|
Determinism: two runs give bitwise equal losses and gradients.

Every check runs on both kernel paths (the ``path`` fixture sets ``KDTRAIN_KD_SINGLE_PASS``):
``single`` = the single-read cluster kernel of a single vocab shard (sm_90+; the test fails if
the dispatcher does not take it, with the reason kd_single_info gives), ``two_pass`` = the
pass-1 / pass-2 kernels. The log table names the path each check ran on.

A summary (device, extension, max errors per check) is written to ``$KDTRAIN_GPU_LOG`` or
``benchmarks/results/kd_loss_gpu_tests.md`` when the module finishes, and printed (``-s``).
"""

import os
import platform
import time
from pathlib import Path

import pytest
import torch

from kdtrain.loss import KDLossConfig, extension_status, kd_fused, kd_loss, load_kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.1)]
TOL = {  # dtype: (loss rtol, grad rtol, grad atol as a fraction of max|grad|)
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.bfloat16: (1e-4, 2.0 ** -7, 1e-3),
    torch.float16: (1e-4, 2.0 ** -9, 1e-4),
}
RECORDS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def gpu_log():
    t0 = time.time()
    yield
    if not RECORDS:
        return
    dev = torch.cuda.get_device_name()
    lines = ["# Fused KD-loss kernel vs reference (GPU)", "",
             f"- device: {dev}; torch {torch.__version__}; CUDA {torch.version.cuda}; python {platform.python_version()}",
             f"- extension: {extension_status()}",
             f"- checks: {len(RECORDS)}, failed: {sum(not r['ok'] for r in RECORDS)}, {time.time() - t0:.1f} s", "",
             "| check | path | dtype | loss rel err | grad max abs err | max abs grad | within tolerance |",
             "|---|---|---|---|---|---|---|"]
    for r in RECORDS:
        lines.append(f"| {r['name']} | {r['path']} | {r['dtype']} | {r['loss_rel']:.2e} | {r['grad_abs']:.2e} "
                     f"| {r['grad_max']:.2e} "
                     f"| {'yes' if r['ok'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out = Path(os.environ.get("KDTRAIN_GPU_LOG", REPO / "benchmarks" / "results" / "kd_loss_gpu_tests.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


@pytest.fixture(scope="module")
def kernels():
    mod = load_kernels()
    assert mod is not None, f"the CUDA kernels did not load: {extension_status()}"
    return mod


@pytest.fixture(params=["single", "two_pass"])
def path(request, monkeypatch):
    """The kernel path under test: single-read (one cluster per row) or two-pass."""
    if request.param == "single" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the single-read path needs compute capability 9.0")
    monkeypatch.setenv(kd_fused.SINGLE_PASS_ENV, "1" if request.param == "single" else "0")
    return request.param


def _data(S, B, V, Vl, k, dtype, seed, tau=1.0, mode="tail_lse"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    student = (3 * torch.randn(S, B, Vl, generator=g, device="cuda")).to(dtype)
    teacher = 3 * torch.randn(S, B, V, generator=g, device="cuda")
    vals, ids = torch.topk(teacher, k, dim=-1)
    tail = torch.logsumexp((teacher / tau).scatter(-1, ids, float("-inf")), -1)
    if mode == "logprobs":
        vals = vals / tau - torch.logsumexp(teacher / tau, -1)[..., None]
    labels = torch.randint(0, V, (S, B), generator=g, device="cuda")
    labels[0, 0] = -100
    mask = (torch.rand(S, B, generator=g, device="cuda") > 0.1).float()
    return student, ids.int(), vals, (tail if mode == "tail_lse" else None), labels, mask


def _run(impl, student, ids, vals, lse, labels, mask, cfg, vocab, grad_scale=1.0, path=None):
    """fwd+bwd; the reference runs in fp64 on the same (rounded) inputs: the exact value to compare to.
    With ``path`` the fused forward must have taken that kernel path."""
    if impl == "reference":
        student, vals = student.double(), vals.double()
        lse = lse.double() if lse is not None else None
    x = student.clone().requires_grad_()
    loss, rep = kd_loss(x, ids, vals, vocab_size=vocab, config=cfg, teacher_tail_lse_SB=lse, labels_SB=labels,
                        loss_mask_SB=mask, impl=impl)
    if path is not None:
        _check_path(path, student, ids.shape[-1])
    (grad_scale * loss).backward()
    return loss.detach(), x.grad, rep


def _check_path(path, student, k):
    used = kd_fused.last_path()
    if used != path:
        info = kd_fused.CudaKernels(load_kernels()).single_info(student.reshape(-1, student.shape[-1]), k)
        pytest.fail(f"expected the {path} path, the dispatcher took {used}; single-read plan: {info}")


def _compare(name, dtype, a, b, path):
    (la, ga, ra), (lb, gb, rb) = a, b  # kernel, reference
    loss_rtol, grad_rtol, grad_atol = TOL[dtype]
    gmax = gb.float().abs().max().item()
    diff = (ga.float() - gb.float()).abs()
    loss_rel = abs(la.item() - lb.item()) / max(abs(lb.item()), 1e-30)
    ok = loss_rel <= loss_rtol and bool((diff <= grad_rtol * gb.float().abs() + grad_atol * gmax).all())
    ok = ok and torch.isfinite(ga).all().item() and ga.dtype == dtype
    for key in ("kd_sum", "ce_sum", "tokens"):
        ok = ok and abs(ra[key].item() - rb[key].item()) <= loss_rtol * max(abs(rb[key].item()), 1.0)
    RECORDS.append(dict(name=name, path=path, dtype=str(dtype).removeprefix("torch."), loss_rel=loss_rel,
                        grad_abs=diff.max().item(), grad_max=gmax, ok=ok))
    assert ok, RECORDS[-1]


@pytest.mark.parametrize("div,beta", DIVS)
@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(kernels, path, div, beta, tail, dtype):
    """Every divergence and tail mode, with CE mixing, tau != 1, tau^2, masks, ignored labels,
    a padded table (vocab 1271 in 1280 columns), grad_output != 1."""
    cfg = KDLossConfig(divergence=div, beta=beta, tail=tail, tau=1.5, scale_by_tau_sq=True, alpha=0.2)
    data = _data(64, 2, 1271, 1280, 50, dtype, seed=1, tau=1.5)
    a = _run("fused", *data, cfg, 1271, grad_scale=3.0, path=path)
    b = _run("reference", *data, cfg, 1271, grad_scale=3.0)
    _compare(f"{div}(beta={beta}) {tail}", dtype, a, b, path)


@pytest.mark.parametrize("mode", ["tail_lse", "logits", "logprobs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_odd_shapes_and_teacher_value_modes(kernels, path, mode, dtype):
    """41 tokens x vocab 1271 (rows not 16-byte aligned) x k = 401, each teacher value mode, tau = 1."""
    cfg = KDLossConfig(divergence="jsd", beta=0.3, tau=1.0, values_are_logprobs=mode == "logprobs", alpha=0.1)
    data = _data(41, 1, 1271, 1271, 401, dtype, seed=2, mode=mode)
    a = _run("fused", *data, cfg, 1271, path=path)
    b = _run("reference", *data, cfg, 1271)
    _compare(f"odd 41x1271 k=401 values={mode}", dtype, a, b, path)


@pytest.mark.parametrize("case", ["k=1024", "k=1", "k=V", "misaligned-base", "wide-shard", "no-grad"])
def test_edge_cases(kernels, path, case):
    dtype = torch.bfloat16
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.1, tau=0.8)
    S, V, Vl, k = 16, 3001, 3008, 64
    if case == "k=1024":
        k = 1024
    elif case == "k=1":
        k = 1
    elif case == "k=V":
        V = Vl = k = 777
        dtype = torch.float32
    elif case == "wide-shard":  # K bitmap above 48 KiB of shared memory (opt-in launch attribute)
        S, V, Vl, k = 4, 400_003, 400_008, 16
    data = list(_data(S, 1, V, Vl, k, dtype, seed=3, tau=0.8))
    if case == "misaligned-base":  # storage offset of one element: scalar path for the whole row
        buf = torch.empty(data[0].numel() + 1, dtype=dtype, device="cuda")
        view = buf[1:].view_as(data[0])
        view.copy_(data[0])
        data[0] = view
    if case == "no-grad":
        with torch.no_grad():
            la, ra = kd_loss(data[0], *data[1:3], vocab_size=V, config=cfg, teacher_tail_lse_SB=data[3],
                             labels_SB=data[4], loss_mask_SB=data[5], impl="fused")
        _check_path(path, data[0], k)
        lb, rb = kd_loss(data[0].double(), data[1], data[2].double(), vocab_size=V, config=cfg,
                         teacher_tail_lse_SB=data[3].double(), labels_SB=data[4], loss_mask_SB=data[5],
                         impl="reference")
        torch.testing.assert_close(la.double(), lb, rtol=1e-4, atol=1e-6)
        RECORDS.append(dict(name=case, path=path, dtype="bfloat16", grad_abs=0.0, grad_max=0.0, ok=True,
                            loss_rel=abs(la.item() - lb.item()) / abs(lb.item())))
        return
    a = _run("fused", *data, cfg, V, grad_scale=0.5, path=path)
    b = _run("reference", *data, cfg, V, grad_scale=0.5)
    _compare(case, dtype, a, b, path)


def test_deterministic(kernels, path):
    """Two runs: bitwise equal loss and gradient (no cross-block atomics, fixed reduction order)."""
    cfg = KDLossConfig(divergence="jsd", beta=0.5, alpha=0.2, tau=2.0)
    data = _data(1024, 2, 32000, 32000, 64, torch.bfloat16, seed=4, tau=2.0)
    runs = [_run("fused", *data, cfg, 32000, path=path) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    RECORDS.append(dict(name="determinism 2048x32000 k=64 (bitwise)", path=path, dtype="bfloat16", loss_rel=0.0,
                        grad_abs=0.0, grad_max=runs[0][1].float().abs().max().item(), ok=True))


def test_grad_output_one_skips_the_scaling_pass(kernels, path):
    """Backward with grad_output == 1 returns the forward's buffer untouched; != 1 scales it."""
    cfg = KDLossConfig()
    data = _data(32, 2, 5000, 5000, 16, torch.bfloat16, seed=5)
    _, g1, _ = _run("fused", *data, cfg, 5000, grad_scale=1.0, path=path)
    _, g3, _ = _run("fused", *data, cfg, 5000, grad_scale=3.0, path=path)
    torch.testing.assert_close(g3.float(), (3.0 * g1.float()).bfloat16().float(), rtol=0, atol=0)

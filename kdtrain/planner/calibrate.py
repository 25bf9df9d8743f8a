"""``kdtrain calibrate``: measure the local device and write a planner profile.

Measured on one device (CUDA when available, else CPU, so the path is tested anywhere):

* matmul rate: a large square GEMM (bf16 8192^3 on CUDA, fp32 1024^3 on CPU) gives
  ``matmul_flops``; a skinny one (64 rows) fits ``tokens_half`` of the small-matmul penalty;
* copy bandwidth: a large device-to-device copy (read + write bytes / time) gives ``memory_bw``;
* step time: ``--model``'s real training step (kdtrain's GPTModel, grad buffer, AdamW; one rank,
  one micro-batch), large enough to keep the device busy, fits ``elementwise_bytes`` (the
  memory-bound traffic per activation element) so that the time model reproduces it; with
  ``--small-model``, a small model's step, bound by the host's kernel launches, fits
  ``layer_overhead_s``. The model's GEMMs are taken to run at the measured GEMM rate;
* decoding: with ``--small-model``, one on-policy sampling call of that model (models/generate.py:
  its micro-batch of rows, every position after the window's first quarter sampled) and of the
  same model cut to one layer fit the host time of a key/value-cached decode forward, per layer
  (``decode_layer_s``, the slope) and for the rest of a position (``decode_token_s``).

Network figures (NVLink, NIC, latencies, GPUs per node) cannot be measured from one process: they
are kept from ``--base`` (one GPU on a workstation says nothing about the nodes a plan targets). The JSON holds ``profile`` (what ``--profile FILE`` loads) and
``measurements`` (raw numbers, the measured and re-predicted step time).
"""

from __future__ import annotations

import os
import time
from typing import Optional

from .profiles import GiB, check_profile_path, get_profile, save_profile


def _timed(fn, sync, iters: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_matmul(torch, device, dtype, n: int, rows: int, iters: int) -> float:
    a = torch.randn(rows, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = _timed(lambda: torch.mm(a, b), sync, iters)
    return 2.0 * rows * n * n / t


def measure_copy(torch, device, nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = _timed(lambda: dst.copy_(src), sync, iters)
    return 2.0 * src.numel() * 4 / t


def measure_step(model_name: str, seq_len: int, micro_batch: int, iters: int, device, dtype,
                 compile: bool = False) -> float:
    """Median seconds of a full single-rank training step (1 micro-batch) of ``model_name``
    (``compile``: with compiled layers, as ``precision.compile`` builds them; the untimed first
    step compiles)."""
    import numpy as np
    import torch

    from ..config import OptimizerConfig, load_model_config
    from ..parallel import RoleLayout, build_role_groups
    from ..training.batches import make_microbatch
    from ..training.pretrain import LM_REPORT_KEYS, build_trainable, lm_forward_step
    from ..training.step import train_step

    cfg = load_model_config(model_name, "--model")
    if seq_len > cfg.max_seq_length:
        raise ValueError(f"--seq-len: {seq_len} exceeds max_seq_length={cfg.max_seq_length} of {cfg.name!r}")
    groups = build_role_groups(RoleLayout("calibrate", 0, 1, 1, 1))
    role = build_trainable(cfg, groups, OptimizerConfig(), seq_len, micro_batch, device, dtype, seed=1,
                           compile=compile)
    rng = np.random.default_rng(0)
    mb = make_microbatch(rng.integers(0, cfg.vocab_size, size=(micro_batch, seq_len + 1)), device)
    fwd = lm_forward_step(cfg.vocab_size, groups.pgc.tp)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return _timed(lambda: train_step(role.schedule, fwd, [mb], role.grads, role.optimizer, groups, 1e-5, 1.0,
                                     cfg.tie_embeddings, LM_REPORT_KEYS), sync, iters)


def measure_decode(cfg, seq_len: int, rows: int, iters: int, device, dtype) -> tuple[float, int]:
    """Median seconds of one sampling call of the model ``cfg`` (a ``ModelConfig``) over ``rows``
    random windows of ``seq_len + 1`` tokens, sampling every position after the first quarter;
    and that prompt length."""
    import numpy as np
    import torch

    from ..models import build_gpt
    from ..models.generate import sample_replies
    from ..parallel import RoleLayout, build_role_groups

    model = build_gpt(cfg, build_role_groups(RoleLayout(f"calibrate-decode-{cfg.num_layers}", 0, 1, 1, 1)),
                      device=device, dtype=dtype, seed=1)
    prompt = max(1, seq_len // 4)
    windows = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, seq_len + 1))).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    spans = [[(prompt, seq_len + 1)]] * rows
    return _timed(lambda: sample_replies(model, windows, spans, vocab_size=cfg.vocab_size, temperature=1.0, seed=0,
                                         sample_ids=range(rows)), sync, iters), prompt


def predicted_decode(profile, cfg, seq_len: int, rows: int, prompt: int, d: int) -> float:
    """The planner's seconds for ``measure_decode``'s call of the model ``cfg`` (a ModelConfig)."""
    from .memory import ModelShape
    from .timing import sampling_time

    return sampling_time(ModelShape.of(cfg), 1, 1, seq_len, rows, 1, prompt, profile, d)


def fit_decode(profile, cfg, seq_len: int, rows: int, iters: int, device, dtype, d: int):
    """``profile`` with ``decode_layer_s`` and ``decode_token_s`` fitted to sampling calls of
    ``cfg`` at its depth and cut to one layer; and the measurements."""
    import dataclasses

    depths = sorted({cfg.num_layers, 1}, reverse=True)
    host, measured = {}, {}
    for layers in depths:
        c = dataclasses.replace(cfg, num_layers=layers)
        t, prompt = measure_decode(c, seq_len, rows, iters, device, dtype)
        # The host time per position that makes the model reproduce the call (all of it put in
        # decode_token_s for now).
        host[layers] = _bisect(lambda x: predicted_decode(profile.replace(decode_layer_s=0.0, decode_token_s=x), c,
                                                          seq_len, rows, prompt, d), t, 0.0, 0.05)
        measured[layers] = t
    if len(depths) == 2:
        per_layer = max(0.0, (host[depths[0]] - host[1]) / (depths[0] - 1))
        rest = max(0.0, host[1] - per_layer)
    else:  # a one-layer model: the two parts cannot be told apart
        per_layer = rest = host[1] / 2
    profile = profile.replace(decode_layer_s=per_layer, decode_token_s=rest)
    return profile, {"decode_prompt": prompt, "decode_s": measured[depths[0]], "decode_one_layer_s": measured[1],
                     "decode_layer_s": per_layer, "decode_token_s": rest,
                     "predicted_decode_s": predicted_decode(profile, cfg, seq_len, rows, prompt, d),
                     "predicted_decode_one_layer_s": predicted_decode(
                         profile, dataclasses.replace(cfg, num_layers=1), seq_len, rows, prompt, d)}


def predicted_step(profile, model_name: str, seq_len: int, micro_batch: int, d: int) -> float:
    from ..config import load_model_config
    from .memory import ModelShape
    from .timing import Placement, student_time

    m = model_name if isinstance(model_name, ModelShape) else ModelShape.of(load_model_config(model_name, "--model"))
    return student_time(m, 1, 1, 1, seq_len, micro_batch, 1, profile, Placement(0, profile.gpus_per_node),
                        0.0, d).total


def _bisect(predict, measured: float, lo: float, hi: float) -> float:
    """Smallest x in [lo, hi] with predict(x) >= measured (predict non-decreasing); lo if
    predict(lo) already is, hi if even predict(hi) is not."""
    if predict(lo) >= measured:
        return lo
    if predict(hi) < measured:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict(mid) >= measured:
            hi = mid
        else:
            lo = mid
    return hi


def fit_profile(profile, big: tuple, small: Optional[tuple], d: int):
    """Fit ``elementwise_bytes`` to a large model's measured step (device-bound) and, when
    ``small`` is given, ``layer_overhead_s`` to a small model's (host-bound); two rounds, since
    each fit holds the other parameter. ``big``/``small``: (model, seq_len, micro_batch, seconds)."""
    from ..config import load_model_config
    from .memory import ModelShape

    big = (ModelShape.of(load_model_config(big[0], "--model")), *big[1:])
    small = (ModelShape.of(load_model_config(small[0], "--small-model")), *small[1:]) if small else None
    for _ in range(2 if small else 1):
        name, seq, mb, measured = big
        eb = _bisect(lambda x: predicted_step(profile.replace(elementwise_bytes=x), name, seq, mb, d), measured,
                     0.0, 512.0)
        profile = profile.replace(elementwise_bytes=eb)
        if small:
            name, seq, mb, measured = small
            oh = _bisect(lambda x: predicted_step(profile.replace(layer_overhead_s=x), name, seq, mb, d), measured,
                         0.0, 0.05)
            profile = profile.replace(layer_overhead_s=oh)
    return profile


def calibrate(out: str, base=None, model: str = "demo-student", seq_len: int = 256, micro_batch: int = 4,
              iters: int = 5, device: str = "auto", small_model: Optional[str] = None,
              small_seq_len: Optional[int] = None, small_micro_batch: Optional[int] = None,
              compile: bool = False) -> dict:
    """Measure this device, fit the profile, write it to ``out``; returns ``{"profile", "measurements"}``.

    ``model`` (large enough to keep the device busy) fits ``elementwise_bytes``; ``small_model``
    (small enough to be bound by the host's kernel launches), when given, fits
    ``layer_overhead_s``, else that figure is kept from ``base``. ``compile``: the steps run with
    compiled layers (``precision.compile``), so the fitted host time and memory-bound traffic are
    those of compiled runs; plan them with this profile."""
    import torch

    from ..parallel import init_distributed, shutdown_distributed

    small_seq_len, small_micro_batch = small_seq_len or seq_len, small_micro_batch or micro_batch
    if min(iters, seq_len, micro_batch, small_seq_len, small_micro_batch) < 1:
        raise ValueError("--iters, --seq-len, --micro-batch, --small-seq-len and --small-micro-batch must be >= 1")
    check_profile_path(out)  # before minutes of measuring
    started_here = not torch.distributed.is_initialized()
    env = init_distributed(device)
    try:
        dev = env.device
        cuda = dev.type == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        d = 2 if cuda else 4
        base_profile = get_profile(base or ("h100-80gb" if cuda else "cpu"), "--base")
        n_big, n_small = (8192, 64) if cuda else (1024, 16)
        big = measure_matmul(torch, dev, dtype, n_big, n_big, iters)
        small = measure_matmul(torch, dev, dtype, n_big, n_small, iters)
        copy_bw = measure_copy(torch, dev, (1 << 30) if cuda else (64 << 20), iters)
        # rate(rows) = big / (1 + tokens_half / rows)  =>  tokens_half = rows * (big / small - 1)
        tokens_half = max(0.0, n_small * (big / small - 1.0))
        if cuda:
            props = torch.cuda.get_device_properties(dev)
            memory, name = float(props.total_memory), props.name.replace(" ", "-").lower()
        else:
            memory, name = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "cpu-local"
        # The model's GEMMs run at the measured large-GEMM rate (model_efficiency 1); what the
        # step spends beyond that is fitted as memory-bound traffic and host launch time.
        profile = base_profile.replace(
            name=f"{name}-calibrated", matmul_flops=big, peak_flops=max(base_profile.peak_flops, big),
            model_efficiency=1.0, memory_bw=copy_bw, tokens_half=tokens_half, memory_bytes=memory,
            memory_reserve_bytes=min(base_profile.memory_reserve_bytes, 0.1 * memory))
        step = measure_step(model, seq_len, micro_batch, iters, dev, dtype, compile)
        small_step = (measure_step(small_model, small_seq_len, small_micro_batch, iters, dev, dtype, compile)
                      if small_model else None)
        profile = fit_profile(profile, (model, seq_len, micro_batch, step),
                              (small_model, small_seq_len, small_micro_batch, small_step) if small_model else None, d)
        decode: dict = {}
        if small_model:
            from ..config import load_model_config

            profile, decode = fit_decode(profile, load_model_config(small_model, "--small-model"), small_seq_len,
                                         small_micro_batch, iters, dev, dtype, d)
        measurements = {
            "device": str(dev) if not cuda else torch.cuda.get_device_name(dev),
            "matmul_tflops": big / 1e12, "matmul_small_tflops": small / 1e12, "copy_gbps": copy_bw / 1e9,
            "memory_gib": memory / GiB, "model": model, "seq_len": seq_len, "micro_batch": micro_batch,
            "step_time_s": step, "predicted_step_time_s": predicted_step(profile, model, seq_len, micro_batch, d),
            "elementwise_bytes": profile.elementwise_bytes, "layer_overhead_s": profile.layer_overhead_s,
            "dtype": str(dtype).removeprefix("torch."), "iters": iters, "compiled_layers": compile,
        }
        if small_model:
            measurements.update(small_model=small_model, small_seq_len=small_seq_len,
                                small_micro_batch=small_micro_batch, small_step_time_s=small_step,
                                small_predicted_step_time_s=predicted_step(profile, small_model, small_seq_len,
                                                                           small_micro_batch, d), **decode)
        save_profile(profile, out, measurements)
        return {"profile": profile, "measurements": measurements}
    finally:
        if started_here:
            shutdown_distributed()

"""Throughput and model-FLOPs utilisation.

MFU = (model FLOPs per token x tokens per second) / (number of devices x peak dense FLOP/s).
Model FLOPs per token are ``ModelConfig.flops_per_token`` (6 x matmul parameters incl. the output
layer + 12 x layers x seq x heads x head_dim for attention; no recomputation credited). The peak
is ``logging.peak_tflops`` when set, else the bf16 dense peak of a known GPU; on CPU there is no
meaningful peak and MFU is not reported.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,  # SXM; the PCIe part is 756
    "A100": 312.0,
    "L40S": 362.1,
    "B200": 2250.0,
}


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756.0
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


class Throughput:
    """Wall time of a step and the rates derived from it."""

    def __init__(self, tokens_per_step: int, samples_per_step: int, flops_per_token: float,
                 num_devices: int, peak: Optional[float], device: torch.device):
        self.tokens_per_step = tokens_per_step
        self.samples_per_step = samples_per_step
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak
        self.device = device
        self._t0 = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> dict:
        """The step's rates (``rates`` of its wall time)."""
        self._sync()
        return self.rates(time.perf_counter() - self._t0)

    def rates(self, seconds: float, steps: int = 1) -> dict:
        """Rates of ``steps`` steps that took ``seconds`` in all (step_time_s is their mean)."""
        dt = seconds / steps
        tokens_per_s = self.tokens_per_step / dt
        tflops = self.flops_per_token * tokens_per_s / self.num_devices / 1e12
        out = {"step_time_s": dt, "tokens_per_s": tokens_per_s, "samples_per_s": self.samples_per_step / dt,
               "tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        if self.device.type == "cuda":  # high-water mark since the start of the run
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out


class IntervalSums:
    """The steps since the last log line (``logging.interval``): their report sums and wall time,
    so that a line reports the interval's mean loss and its throughput, not the last step's alone
    (Megatron's habit). ``take()`` returns them and starts a new interval."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.seconds, self.steps = 0.0, 0

    def add(self, sums: dict[str, float], seconds: float) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.seconds += seconds
        self.steps += 1

    def take(self, reset: bool = True) -> tuple[dict[str, float], float, int]:
        """(sums, seconds, steps) so far; a new interval starts unless ``reset`` is False."""
        out = (dict(self.sums), self.seconds, self.steps)
        if reset:
            self._reset()
        return out

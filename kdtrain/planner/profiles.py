"""Hardware profiles: what the planner's memory and time models know about a device and its links.

A profile is a flat dataclass of rates, sizes and latencies (SI units: bytes, seconds, FLOP/s).
Built-in profiles come from vendor data sheets plus what ``kdtrain calibrate`` measured on an H100
with kdtrain's megatron-core local layer spec (bf16): GEMMs inside the model run at the large-GEMM
rate, the memory-bound rest of a layer (norms, then with fp32 weights; RoPE, SwiGLU, residual
adds, layout copies) moves about 18 bytes per element of its activations, and the host needs about
1.9 ms per layer per forward-equivalent pass to launch it all (what bounds small models). Both
software figures predate bf16 norm weights and the direct layer forward (models/layer.py) and
overstate today's costs until re-measured. ``kdtrain calibrate`` measures the local device and
writes a JSON profile that replaces them.

    profile = get_profile("h100-80gb")          # built-in, by name
    profile = load_profile("runs/h100.json")    # written by `kdtrain calibrate`
    save_profile(profile, "my.json")
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..cli import check_out_file

GB = 1e9
GiB = 2.0**30
TFLOPS = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # dense bf16 tensor-core peak, FLOP/s (the MFU denominator)
    matmul_flops: float  # achieved rate of a large bf16 GEMM, FLOP/s
    # Fraction of ``matmul_flops`` the model's GEMMs and flash attention reach at large sizes
    # (attention FLOPs counted for the full S x S matrix, as in the MFU convention).
    model_efficiency: float
    memory_bytes: float  # device memory (HBM)
    memory_reserve_bytes: float  # CUDA context, NCCL buffers, allocator fragmentation: never usable
    memory_bw: float  # device memory bandwidth, bytes/s (copies, optimizer, logits passes)
    intra_node_bw: float  # per-GPU, per-direction bus bandwidth inside a node (NVLink), bytes/s
    intra_node_latency: float  # seconds per collective step / message inside a node
    inter_node_bw: float  # per-GPU bandwidth across nodes (one NIC per GPU), bytes/s
    inter_node_latency: float  # seconds per collective step / message across nodes
    gpus_per_node: int
    # Small-matmul penalty: efficiency = 1 / (1 + tokens_half / tokens + width_half / width), with
    # tokens = tokens per micro-batch and width = the smallest TP-sharded matmul dimension.
    tokens_half: float = 128.0
    width_half: float = 64.0
    # Host time to launch one layer's kernels per forward-equivalent pass (a backward counts two):
    # a pass takes max(device time, host time), so this bounds small models.
    layer_overhead_s: float = 0.0
    # HBM bytes the memory-bound ops of a layer move per element of their activations per forward
    # (see ModelShape.elementwise_width); the backward moves twice that.
    elementwise_bytes: float = 0.0
    # Host time of one key/value-cached decode forward (on-policy sampling, models/generate.py):
    # ``decode_layer_s`` per layer plus ``decode_token_s`` for the rest of a position (embedding,
    # output layer, the draw, the decoder's bookkeeping). None: not measured, taken as
    # ``layer_overhead_s`` each (`kdtrain calibrate --small-model` measures both).
    decode_layer_s: Optional[float] = None
    decode_token_s: Optional[float] = None

    def decode_host_s(self, layers: int) -> float:
        """Host seconds of one decode forward of a ``layers``-layer model."""
        per_layer = self.layer_overhead_s if self.decode_layer_s is None else self.decode_layer_s
        rest = self.layer_overhead_s if self.decode_token_s is None else self.decode_token_s
        return layers * per_layer + rest

    def check(self, where: str = "profile") -> None:
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            v = getattr(self, f.name)
            if f.name.startswith("decode_") and v is None:
                continue
            if f.name in ("memory_reserve_bytes", "decode_layer_s", "decode_token_s", "layer_overhead_s", "tokens_half",
                          "width_half", "intra_node_latency", "inter_node_latency", "elementwise_bytes"):
                ok = v >= 0
            elif f.name == "model_efficiency":
                ok = 0 < v <= 1
            else:
                ok = v > 0
            if not ok:
                raise ValueError(f"{where}.{f.name}: out of range, got {v!r}")
        if self.matmul_flops > self.peak_flops * 1.05:
            raise ValueError(f"{where}.matmul_flops: {self.matmul_flops:.3g} exceeds peak_flops {self.peak_flops:.3g}")
        if self.memory_reserve_bytes >= self.memory_bytes:
            raise ValueError(f"{where}.memory_reserve_bytes: leaves no usable memory")

    @property
    def usable_memory(self) -> float:
        return self.memory_bytes - self.memory_reserve_bytes

    def achieved_flops(self, tokens: float, width: float) -> float:
        """Rate of a transformer pass over ``tokens`` tokens whose smallest sharded matmul
        dimension is ``width``."""
        eff = 1.0 / (1.0 + self.tokens_half / max(tokens, 1.0) + self.width_half / max(width, 1.0))
        return self.matmul_flops * self.model_efficiency * eff

    def replace(self, **changes) -> "HardwareProfile":
        out = dataclasses.replace(self, **changes)
        out.check()
        return out


def _gpu(name, peak_tflops, gemm_tflops, mem_gib, hbm_gbps, nvlink_gbps, nic_gbps, **kw) -> HardwareProfile:
    return HardwareProfile(
        name=name, peak_flops=peak_tflops * TFLOPS, matmul_flops=gemm_tflops * TFLOPS,
        model_efficiency=kw.pop("model_efficiency", 1.0), memory_bytes=mem_gib * GiB,
        memory_reserve_bytes=kw.pop("reserve_gib", 3.0) * GiB, memory_bw=hbm_gbps * GB,
        intra_node_bw=nvlink_gbps * GB, intra_node_latency=kw.pop("intra_latency", 8e-6),
        inter_node_bw=nic_gbps * GB, inter_node_latency=kw.pop("inter_latency", 20e-6),
        gpus_per_node=kw.pop("gpus_per_node", 8), tokens_half=kw.pop("tokens_half", 128.0),
        width_half=kw.pop("width_half", 64.0), layer_overhead_s=kw.pop("layer_overhead_s", 1.9e-3),
        elementwise_bytes=kw.pop("elementwise_bytes", 18.0), **kw)


# Data-sheet peaks and bandwidths; NVLink is per GPU per direction; NICs one per GPU
# (HDR 200 Gb/s on A100 systems, NDR 400 Gb/s on H100/H200 systems); GEMM rates are typical
# measured large bf16 GEMMs (cuBLAS): 760-800 TFLOP/s on the H100 and H200 here, ~80% of peak on A100s.
BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    "a100-40gb": _gpu("a100-40gb", 312.0, 240.0, 40.0, 1555.0, 300.0, 25.0),
    "a100-80gb": _gpu("a100-80gb", 312.0, 250.0, 80.0, 2039.0, 300.0, 25.0),
    "h100-80gb": _gpu("h100-80gb", 989.4, 760.0, 80.0, 3350.0, 450.0, 50.0),
    "h200": _gpu("h200", 989.4, 790.0, 141.0, 4800.0, 450.0, 50.0),
    # A laptop-sized stand-in: lets the planner's tests and examples run the same code paths.
    "cpu": HardwareProfile(
        name="cpu", peak_flops=0.2 * TFLOPS, matmul_flops=0.1 * TFLOPS, model_efficiency=0.5,
        memory_bytes=16 * GiB, memory_reserve_bytes=1 * GiB, memory_bw=10 * GB, intra_node_bw=5 * GB,
        intra_node_latency=20e-6, inter_node_bw=1 * GB, inter_node_latency=100e-6, gpus_per_node=2,
        tokens_half=16.0, width_half=8.0, layer_overhead_s=50e-6, elementwise_bytes=8.0),
}
_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "a100": "a100-80gb", "a100-40": "a100-40gb",
            "a100-80": "a100-80gb", "h100-80": "h100-80gb", "h200-141gb": "h200"}


def get_profile(name_or_path: Union[str, HardwareProfile], where: str = "--profile") -> HardwareProfile:
    """A built-in profile by name (case-insensitive) or a profile JSON file."""
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    key = str(name_or_path).lower()
    key = _ALIASES.get(key, key)
    if key in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[key]
    if Path(name_or_path).is_file():
        return load_profile(name_or_path, where)
    raise ValueError(f"{where}: {name_or_path!r} is neither a built-in profile ({', '.join(BUILTIN_PROFILES)}) "
                     f"nor a profile JSON file")


def load_profile(path, where: str = "--profile") -> HardwareProfile:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise ValueError(f"{where}: cannot read profile {path}: {e}") from None
    fields = {f.name for f in dataclasses.fields(HardwareProfile)}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: profile {path} must be a JSON object, got {type(raw).__name__}")
    data = raw.get("profile", raw)  # calibrate writes {"profile": {...}, "measurements": {...}}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: profile {path}: profile must be a JSON object, got {type(data).__name__}")
    missing = sorted(f.name for f in dataclasses.fields(HardwareProfile)
                     if f.name not in data and f.default is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{where}: profile {path} lacks {', '.join(missing)}")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: profile {path} has unknown keys {', '.join(unknown)}")
    for f in dataclasses.fields(HardwareProfile):
        v = data.get(f.name, f.default)
        if f.name == "name":
            ok, want = isinstance(v, str), "a string"
        elif f.name == "gpus_per_node":
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        else:  # the decode_ times may be null (not measured)
            ok = (v is None and f.name.startswith("decode_")) or (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            want = "a finite number"
        if not ok:
            raise ValueError(f"{where}: profile {path}: {f.name} must be {want}, got {v!r}")
    profile = HardwareProfile(**data)
    profile.check(f"{where} {path}")
    return profile


def check_profile_path(path, where: str = "--out") -> None:
    """A profile JSON can be written at ``path`` (checked before measuring; nothing is created)."""
    check_out_file(path, where, "profile JSON file")


def save_profile(profile: HardwareProfile, path, measurements: dict | None = None) -> None:
    profile.check()
    out = {"profile": dataclasses.asdict(profile)}
    if measurements:
        out["measurements"] = measurements
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2) + "\n")
    except OSError as e:  # a file in the way, no permission, a full disk
        raise ValueError(f"cannot write profile {path}: {e.strerror or e}") from None

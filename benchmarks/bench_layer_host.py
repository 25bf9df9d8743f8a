"""Transformer-layer cost: megatron-core's stock layer forward vs kdtrain's direct forward
(kdtrain/models/layer.py), with Hugging Face's Llama decoder layer as a yardstick.

Times the decoder stack alone (no embedding, no output layer) per layer: a no-grad forward (the
teacher's pass) and a forward + backward (the student's). On CPU at tiny shapes the arithmetic is
negligible, so the figures are the host's cost per layer; on a GPU the script reports both the
host time to issue the work and the wall time after synchronising: where they are equal, the
layers are bound by the host, not the GPU.

CPU (tiny model, a few seconds):

    python benchmarks/bench_layer_host.py --cpu-tiny --out /tmp/layer-host-cpu

GPU (the ~150M student of the H100 benchmarks, bf16, micro-batch 8 x 1024 tokens; under a minute):

    python benchmarks/bench_layer_host.py --model llama-150m-32k --out benchmarks/results/layer_host_h100
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kdtrain.config import load_model_config
from kdtrain.models import build_gpt
from kdtrain.parallel import RoleLayout, build_role_groups, init_distributed, shutdown_distributed


def _timed(fn, steps: int, device: torch.device) -> tuple[float, float]:
    """Median (host seconds to issue ``fn``, wall seconds until the device finished it)."""
    host, wall = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(host), statistics.median(wall)


def _megatron_stack(cfg, groups, device, dtype, direct: bool, fp32_norms: bool = False):
    model = build_gpt(cfg, groups, device=device, dtype=dtype, seed=1)
    for layer in model.decoder.layers:
        layer._direct = direct
        if fp32_norms:  # as megatron-core creates them: torch's RMSNorm then takes its unfused path
            layer.input_layernorm.float()
            layer.pre_mlp_layernorm.float()

    def run(x):  # the rotary table as GPTModel passes it (megatron-core caches it per length)
        rope = model.rotary_pos_emb(x.shape[0]) if cfg.position_embedding == "rope" else None
        return model.decoder(x, attention_mask=None, rotary_pos_emb=rope)

    return model, run, lambda s, b: torch.randn(s, b, cfg.hidden_size, device=device, dtype=dtype)


def _hf_stack(cfg, device, dtype):
    """The same shape as a Hugging Face Llama (rmsnorm / swiglu / rope configs only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
                     head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
                     rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rope_theta, attn_implementation="sdpa")
    model = LlamaForCausalLM(hc).to(device=device, dtype=dtype).model

    def run(x):
        pos = torch.arange(x.shape[1], device=device)[None]
        pe = model.rotary_emb(x, pos)
        for layer in model.layers:
            x = layer(x, position_embeddings=pe, attention_mask=None, position_ids=pos)
            x = x[0] if isinstance(x, tuple) else x
        return model.norm(x)

    return model, run, lambda s, b: torch.randn(b, s, cfg.hidden_size, device=device, dtype=dtype)


def measure(name, model, run, make_input, seq, batch, steps, device) -> dict:
    x = make_input(seq, batch)
    x_train = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            run(x)

    def train():
        run(x_train).float().square().mean().backward()

    out = {"system": name}
    for kind, fn in (("forward", forward), ("train", train)):
        for _ in range(3):  # warm-up (allocator, lazy inits)
            fn()
        host, wall = _timed(fn, steps, device)
        out[f"{kind}_host_ms_per_layer"] = 1e3 * host / cfg_layers(model)
        out[f"{kind}_wall_ms_per_layer"] = 1e3 * wall / cfg_layers(model)
    model.zero_grad(set_to_none=True)
    return out


def cfg_layers(model) -> int:
    return len(model.decoder.layers) if hasattr(model, "decoder") else len(model.layers)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-150m-32k")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed runs per figure (default 10; 30 with --cpu-tiny)")
    p.add_argument("--cpu-tiny", action="store_true", help="tiny model on CPU, fp32, seq 16, batch 1")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face yardstick")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    env = init_distributed("cpu" if args.cpu_tiny else "auto")
    device = env.device
    if args.cpu_tiny:
        torch.set_num_threads(1)
        cfg = dataclasses.replace(load_model_config("tiny"), num_layers=8)
        seq, batch, dtype, steps = 16, 1, torch.float32, args.steps or 30
    else:
        cfg = load_model_config(args.model)
        seq, batch, steps = args.seq_len, args.micro_batch, args.steps or 10
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    rows = []
    variants = [("megatron-core stock forward", False, False), ("kdtrain (direct forward)", True, False)]
    if dtype != torch.float32:  # what the previous H100 figures ran: stock forward, fp32 norm weights
        variants.insert(0, ("megatron-core stock forward, fp32 norm weights", False, True))
    for name, direct, fp32_norms in variants:
        model, run, make = _megatron_stack(cfg, groups, device, dtype, direct, fp32_norms)
        rows.append(measure(name, model, run, make, seq, batch, steps, device))
        del model
    llama_like = cfg.normalization == "rmsnorm" and cfg.activation == "swiglu" and cfg.position_embedding == "rope"
    if llama_like and not args.no_hf:
        try:
            model, run, make = _hf_stack(cfg, device, dtype)
        except ImportError:
            pass
        else:
            rows.append(measure("Hugging Face LlamaDecoderLayer", model, run, make, seq, batch, steps, device))
    shutdown_distributed()

    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else platform.processor() or platform.machine(), "torch": torch.__version__,
            "model": cfg.name, "layers": cfg.num_layers, "hidden": cfg.hidden_size, "seq_len": seq,
            "micro_batch": batch, "dtype": str(dtype).removeprefix("torch."), "steps": steps,
            "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_host.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Layer cost per layer: {meta['device']}, {meta['date']}", "",
             f"{cfg.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {batch} x {seq} tokens, "
             f"{meta['dtype']}, torch {torch.__version__}; medians of {steps} runs.", "",
             "| layer forward | no-grad host ms | no-grad wall ms | train host ms | train wall ms |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['forward_host_ms_per_layer']:.3f} | {r['forward_wall_ms_per_layer']:.3f} | "
                     f"{r['train_host_ms_per_layer']:.3f} | {r['train_wall_ms_per_layer']:.3f} |")
    (args.out / "layer_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

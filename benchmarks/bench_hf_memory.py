"""Host memory of moving a Hugging Face model in and out of kdtrain.

Writes a random-weight Hugging Face Llama directory (bf16 safetensors, no transformers model is
built) and measures the peak resident memory of each operation in its own process, minus that
process's resident memory after the imports:

* ``whole``: the whole model converted in memory (``hf_to_kdtrain_state``; what a converter that
  builds one state dict needs);
* ``import``: ``kdtrain convert hf-to-kdtrain`` (streamed into shard files of ``--shard-gb``);
* ``export``: ``kdtrain convert kdtrain-to-hf`` of the converted checkpoint (streamed, bf16);
* ``direct``: a run's ``load:`` of the Hugging Face directory into a TP=1 fp32 model, minus the
  model's own parameter bytes (what loading costs beyond the weights it fills).

CPU, about a minute for the default ~0.5B-parameter model (1 GB of bf16 weights):

    python benchmarks/bench_hf_memory.py --out benchmarks/results/hf_memory_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("whole", "import", "export", "direct")


def write_hf_llama(path: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A Llama directory with random bf16 weights; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    heads, kv = hidden // 64, max(1, hidden // 256)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": 64, "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * 64, hidden),
                       p + "self_attn.k_proj.weight": (kv * 64, hidden),
                       p + "self_attn.v_proj.weight": (kv * 64, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * 64),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 2 for t in tensors.values())


def _status_mb(key: str) -> float:
    """A /proc/self/status memory figure in MiB (VmHWM: peak resident set of this process image,
    reset at exec, unlike getrusage's maxrss, which a child inherits from its parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


class AnonPeak:
    """Peak anonymous resident memory (RssAnon: heap and tensors, not the file pages that
    memory-mapped weights put in the resident set), sampled every millisecond on a thread."""

    def __init__(self):
        import threading

        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def run_mode(mode: str, hf: Path, work: Path, shard_bytes: int) -> dict:
    """In a fresh process: one operation's peak RSS above the post-import baseline."""
    import torch

    from kdtrain.convert.hf_export import export_hf
    from kdtrain.convert.hf_import import hf_to_kdtrain_state, import_hf

    torch.set_num_threads(1)
    base, base_anon = _status_mb("VmRSS"), _status_mb("RssAnon")
    sampler = AnonPeak()
    extra = 0.0
    if mode == "whole":
        cfg, state, _ = hf_to_kdtrain_state(hf, "m")
    elif mode == "import":
        import_hf(hf, work / "kd", name="m", shard_bytes=shard_bytes)
    elif mode == "export":
        export_hf(work / "kd", work / "hf_out", dtype="bf16", tokenizer=None, shard_bytes=shard_bytes)
    elif mode == "direct":
        import torch.distributed as dist

        from kdtrain.config import load_model_config
        from kdtrain.models import build_gpt
        from kdtrain.parallel import RoleLayout, build_role_groups, shutdown_distributed
        from kdtrain.training.checkpoint_load import load_model_weights

        dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1)
        cfg = load_model_config(str(hf))
        model = build_gpt(cfg, build_role_groups(RoleLayout("m", 0, 1, 1, 1)), device=torch.device("cpu"),
                          dtype=torch.float32, seed=0)
        extra = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        load_model_weights(str(hf), cfg, [(model.param_specs[n], p) for n, p in model.named_parameters()], "teacher")
        shutdown_distributed()
    anon = sampler.stop()
    peak = _status_mb("VmHWM")
    return {"mode": mode, "baseline_mb": base, "peak_mb": peak, "model_param_mb": extra,
            "peak_above_baseline_mb": peak - base - extra,
            "anon_baseline_mb": base_anon, "anon_peak_mb": anon, "anon_above_baseline_mb": anon - base_anon - extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=0.1)
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    ap.add_argument("--_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shard_bytes = int(args.shard_gb * 10**9)
    if args._mode:  # child
        work = Path(args._dir)
        print(json.dumps(run_mode(args._mode, work / "hf", work, shard_bytes)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        weight_bytes = write_hf_llama(work / "hf", args.layers, args.hidden, args.ffn, args.vocab)
        rows = []
        for mode in ("import", "whole", "export", "direct"):  # export reads import's checkpoint
            cmd = [sys.executable, __file__, "--out", str(out), "--_mode", mode, "--_dir", str(work),
                   "--shard-gb", str(args.shard_gb)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "model": {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "vocab": args.vocab,
                        "weight_mb_bf16": weight_bytes / 2**20}, "shard_gb": args.shard_gb, "rows": rows}
    (out / "hf_memory.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Model: Llama-style, {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}: "
             f"{weight_bytes / 2**20:.0f} MiB of bf16 weights; shard size {args.shard_gb} GB.", "",
             "| operation | peak anonymous memory above baseline (MiB) | x weight bytes "
             "| peak RSS incl. mapped file pages (MiB) |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['anon_above_baseline_mb']:.0f} | "
                     f"{r['anon_above_baseline_mb'] / (weight_bytes / 2**20):.2f} | {r['peak_above_baseline_mb']:.0f} |")
    (out / "hf_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

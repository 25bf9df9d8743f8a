"""Operations dispatched per training step, by phase: a device-independent proxy for the host's
launch work (each non-view operation is one kernel launch on a GPU).

Counts every ATen operation reaching the dispatcher (torch's TorchDispatchMode) during one
training step of the 14-layer llama-150m-32k layer structure at tiny widths on CPU (4 micro-batches;
widths do not change the count), split into: the micro-batches' forwards and backwards, the
gradient norm, clipping and the optimizer; plus the operations of one layer's forward. On CPU,
RMSNorm decomposes into several operations that CUDA runs as one kernel, so the forward/backward
counts overstate a GPU's; the optimizer and norm counts are the same on both.

    python benchmarks/count_step_ops.py --out benchmarks/results/step_ops_cpu
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtrain.config import OptimizerConfig, load_model_config  # noqa: E402
from kdtrain.data.mock import MockWindowDataset  # noqa: E402
from kdtrain.parallel import RoleLayout, build_role_groups, shutdown_distributed  # noqa: E402
from kdtrain.training.batches import microbatches  # noqa: E402
from kdtrain.training.pretrain import LM_REPORT_KEYS, build_trainable, lm_forward_step  # noqa: E402
from kdtrain.training.step import train_step  # noqa: E402

VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "detach", "split", "split_with_sizes", "slice",
         "select", "unsqueeze", "expand", "as_strided", "alias", "chunk", "narrow", "reshape", "lift_fresh"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.phase = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.phase, func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def in_phase(counter: Counter, obj, name: str, phase: str) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        old, counter.phase = counter.phase, phase
        try:
            return fn(*a, **k)
        finally:
            counter.phase = old
    setattr(obj, name, wrapped)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    args = ap.parse_args(argv)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = dataclasses.replace(load_model_config("llama-150m-32k"), hidden_size=64, ffn_hidden_size=128,
                              num_attention_heads=4, num_query_groups=2, vocab_size=512)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    seq, micro, global_batch = 32, 2, 8
    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    role = build_trainable(cfg, groups, OptimizerConfig(), seq, micro, torch.device("cpu"), dtype, 0)
    data = MockWindowDataset(seq, cfg.vocab_size, 0)
    forward_step = lm_forward_step(cfg.vocab_size, groups.pgc.tp)
    counter = Counter()
    for obj, name, phase in ((role.schedule, "forward_backward", "forward_backward"),
                             (role.grads, "global_norm", "grad_norm"), (role.grads, "clip", "clip"),
                             (role.optimizer, "step", "optimizer")):
        in_phase(counter, obj, name, phase)

    def step(i: int):
        mbs = microbatches(data.train_sample, i * global_batch, global_batch, micro, 0, 1, torch.device("cpu"))
        train_step(role.schedule, forward_step, mbs, role.grads, role.optimizer, groups, 1e-4, 1.0,
                   cfg.tie_embeddings, LM_REPORT_KEYS)

    step(0)  # optimizer state exists from here on
    with counter:
        step(1)
    layer = role.model.decoder.layers[0]
    hidden = torch.randn(seq, micro, cfg.hidden_size, dtype=dtype)
    freqs = role.model.rotary_pos_emb(seq)
    layer_counter = Counter()
    with layer_counter:
        layer(hidden, None, rotary_pos_emb=freqs)
    shutdown_distributed()

    phases: dict = {}
    for (phase, op), n in counter.counts.items():
        p = phases.setdefault(phase, {"ops": 0, "non_view_ops": 0})
        p["ops"] += n
        p["non_view_ops"] += 0 if op in VIEWS else n
    layer_ops = sum(layer_counter.counts.values())
    layer_non_view = sum(n for (_, op), n in layer_counter.counts.items() if op not in VIEWS)
    res = {"model": f"{cfg.name} structure ({cfg.num_layers} layers) at tiny widths", "dtype": args.dtype,
           "micro_batches": global_batch // micro, "params": len(role.params), "step": phases,
           "layer_forward": {"ops": layer_ops, "non_view_ops": layer_non_view},
           "command": " ".join(sys.argv), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_ops_{args.dtype}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

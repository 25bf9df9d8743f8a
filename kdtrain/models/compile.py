"""``precision.compile: true``: torch.compile the transformer layers of a built model.

Each ``TransformerLayer`` is compiled in place with ``nn.Module.compile``, so parameter names,
state dicts, gradient hooks and checkpoints are unchanged. Dynamo treats a module's parameters as
graph inputs, so every layer of a model runs the same compiled graph: a model compiles once per
micro-batch shape and direction (forward, backward, no-grad forward), not once per layer. Shapes
are static (``dynamic=False``): a run has one micro-batch shape, and a new shape (another
evaluation batch) compiles again rather than generating slower shape-generic code.

Why layers and not the whole model: what the compiler buys is inside a layer. On GPU, inductor
fuses the memory-bound parts (norms, rotary embedding, SwiGLU, residual adds, layout copies) into
a few Triton kernels around the GEMMs and flash attention, and launches the layer from one
generated function: fewer HBM round trips and much less host time per layer, which is what
bounds small models in megatron-core's local layer spec (docs/planner.md, ``layer_overhead_s``).
The embedding, output layer and KD loss stay eager: the vocabulary-sized work has its own fused
kernels (kdtrain/loss), and the pipeline schedule and process-group logic stay plain Python.
Tensor-parallel layers keep their collectives; dynamo traces them as functional collectives.

On CPU inductor generates C++ and computes the same math, which is how CI checks that compiled
layers equal eager ones (tests/test_compile.py). ``KDTRAIN_COMPILE_BACKEND`` picks another
torch.compile backend (default ``inductor``): ``aot_eager`` captures the same graphs and runs
them through the same autograd split without generating code, which is how the multi-rank CPU
tests check capture, graph breaks and collectives without minutes of C++ compilation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch


def check_compile_support(device: torch.device, where: str = "precision.compile") -> None:
    """Fail before building anything when inductor cannot generate code for ``device``."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError(f"{where}: torch.compile on CUDA needs Triton, which is not installed "
                             "(pip install triton matching your torch, or set precision.compile=false)")
    elif not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ValueError(f"{where}: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH "
                         "(or set precision.compile=false)")


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every transformer layer of this pipeline stage in place; returns how many."""
    layers = list(model.decoder.layers) if hasattr(model, "decoder") else []
    backend = os.environ.get("KDTRAIN_COMPILE_BACKEND", "inductor")
    for layer in layers:
        layer.compile(backend=backend, dynamic=False)
    return len(layers)

"""kdtrain: knowledge distillation of megatron-core GPT models with decoupled teacher/student partitions.

Plain install (no GPU, no nvcc needed):       pip install -e .[dev]
Install and build the CUDA loss kernel:        pip install --no-build-isolation -e .
(the kernel is built only when torch is importable at build time, CUDA is available and csrc/ has
sources; otherwise it is compiled just-in-time on first use on a GPU machine, or the pure-torch
reference is used).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _cuda_extensions():
    """Return (ext_modules, cmdclass) for csrc/ when a CUDA build is possible, else ([], {})."""
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources or os.environ.get("KDTRAIN_SKIP_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # pip's isolated build env has no torch: pure-Python install
        return [], {}
    if CUDA_HOME is None or not (torch.cuda.is_available() or os.environ.get("KDTRAIN_FORCE_CUDA_BUILD") == "1"):
        return [], {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        name="kdtrain._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="kdtrain",
    version="0.1.0",
    description="Knowledge distillation of megatron-core GPT models with decoupled teacher/student parallelism",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kdtrain", "kdtrain.*"]),
    package_data={"kdtrain": ["py.typed"]},
    install_requires=[
        # torch is not pinned: GPU users keep the CUDA build they have; the README installs the CPU
        # wheel explicitly before this package so pip never pulls a CUDA build by accident.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "einops",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "wandb",
    ],
    extras_require={
        # Tests: also Hugging Face conversion (transformers, safetensors), the TRL benchmark's CPU mode
        # and the planner's sweep plot.
        "dev": ["pytest", "pytest-timeout", "transformers", "tokenizers", "safetensors", "trl", "matplotlib"],
        # Hugging Face checkpoints (kdtrain convert) and tokenizers (data.tokenizer: tokenizer.json).
        "hf": ["transformers", "tokenizers", "safetensors"],
        # Corpus formats beyond .jsonl/.txt(.gz): .parquet and zstd-compressed files.
        "data": ["pyarrow", "zstandard"],
        "bench": ["transformers", "safetensors", "trl", "matplotlib"],
        # Optional accelerators: imported behind a check, never required.
        "te": ["transformer_engine[pytorch]"],
    },
    entry_points={"console_scripts": ["kdtrain=kdtrain.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

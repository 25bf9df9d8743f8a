"""A broken Transformer Engine install (kdtrain/te_guard.py): megatron-core imports TE whenever it
is installed and catches ImportError only, so a TE whose library fails to load ended every
command inside megatron-core's import. kdtrain warns and runs without it."""

import os
import subprocess
import sys


def test_a_broken_transformer_engine_is_a_warning_not_a_crash(tmp_path):
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text('raise OSError("libtransformer_engine.so: cannot open shared object file")\n')
    code = """
import warnings
warnings.simplefilter("always")
import torch
from kdtrain.data.indexed import _megatron_indexed
_megatron_indexed()  # preprocessing's first megatron-core import
import kdtrain.models
from kdtrain.models import transformer_engine_available
print("TE used:", transformer_engine_available(torch.device("cuda")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TE used: False" in proc.stdout
    assert "Transformer Engine is installed but its import fails (OSError: libtransformer_engine.so" in proc.stderr
    assert proc.stderr.count("Transformer Engine is installed but its import fails") == 1  # warned once

"""A broken Transformer Engine install degrades to running without it.

Transformer Engine is an optional accelerator, and megatron-core imports it whenever it is
installed, catching ImportError only: a library that fails to load (OSError), or a build for
another torch that raises something else, ended every kdtrain command inside megatron-core's
import. ``guard_transformer_engine`` imports it first; if that fails, it warns and hides the
package, so megatron-core and kdtrain run as where it is not installed (kdtrain's local layers).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings


def guard_transformer_engine() -> None:
    """Call before importing megatron-core (cheap after the first call)."""
    if "transformer_engine" in sys.modules or importlib.util.find_spec("transformer_engine") is None:
        return
    try:
        importlib.import_module("transformer_engine")
    except Exception as e:  # noqa: BLE001 - any failure of an optional package's import
        for name in [m for m in sys.modules if m == "transformer_engine" or m.startswith("transformer_engine.")]:
            del sys.modules[name]
        sys.modules["transformer_engine"] = None  # later imports raise ImportError: "not installed"
        warnings.warn(f"kdtrain: Transformer Engine is installed but its import fails ({type(e).__name__}: "
                      f"{str(e)[:200]}); running without it (kdtrain's local layers). Repair or uninstall it.",
                      RuntimeWarning, stacklevel=2)

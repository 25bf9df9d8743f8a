"""Optional packages: imported where a feature needs them, with an error naming the install."""

from __future__ import annotations

import importlib
from types import ModuleType

# The extra of setup.py that installs each optional package.
EXTRAS = {"safetensors": "hf", "tokenizers": "hf", "transformers": "hf", "matplotlib": "bench", "pyarrow": "data",
          "zstandard": "data"}


def need(module: str, purpose: str) -> ModuleType:
    """``import module``, or a ValueError saying that ``purpose`` needs its package and how to
    install it (the base install leaves the Hugging Face, plotting and Parquet packages out)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only the package itself missing; a broken install (a dependency of it missing) is raised
        # as it is.
        if e.name is not None and not (module == e.name or module.startswith(e.name + ".")):
            raise
        package = module.split(".")[0]
        extra = EXTRAS.get(package)
        how = f"pip install {package}" + (f", or pip install -e '.[{extra}]' in the kdtrain checkout" if extra else "")
        raise ValueError(f"{purpose} needs the `{package}` package, which is not installed ({how})") from None

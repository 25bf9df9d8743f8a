"""Hugging Face interop: import HF causal LMs as kdtrain checkpoints and export them back.

``hf_config`` maps config.json <-> ModelConfig, ``layout`` maps tensor names and layouts,
``hf_import`` / ``hf_export`` read and write the files (``import_hf``, ``export_hf``), ``cli`` adds
``kdtrain convert``. Nothing heavy is imported here, so ``kdtrain --help`` stays fast.
"""

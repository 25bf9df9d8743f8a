"""Hugging Face interop: read HF causal LMs (directly or converted) and export kdtrain models back.

``hf_config`` maps config.json <-> ModelConfig, ``layout`` holds the per-tensor conversion rules,
``hf_weights`` reads an HF directory one parameter at a time (direct ``load:`` of a run),
``hf_import`` / ``hf_export`` stream whole models to and from files (``import_hf``, ``export_hf``),
``cli`` adds ``kdtrain convert``. Nothing heavy is imported here, so ``kdtrain --help`` stays fast.
"""

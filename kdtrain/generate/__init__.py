"""`kdtrain generate`: sample from a checkpoint (the sampler itself is kdtrain/models/generate.py)."""

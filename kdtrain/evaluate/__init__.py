"""`kdtrain eval`: held-out losses of checkpoints on a corpus."""

"""Layer 6: the training loop and checkpoints."""

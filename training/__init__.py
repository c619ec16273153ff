"""CLARE in PyTorch: model, losses, training loop, evaluation (imports torch)."""

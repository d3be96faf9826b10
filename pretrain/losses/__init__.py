"""Self-supervised losses, one per module, as pure functions."""

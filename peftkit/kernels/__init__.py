"""Fused kernels below the objectives and the loop: the head's projection and cross-entropy in
chunks (`linear_ce`), used by the causal-LM loss and reported by the loop."""

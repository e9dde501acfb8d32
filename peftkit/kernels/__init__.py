"""Fused compute paths for training, below both the training loop and the memory planner.

- `lora_mlp.py`: the LoRA SwiGLU MLP as one autograd function (fewer saved activations);
- `linear_ce.py`: the vocabulary projection fused with the cross-entropy (no logits kept);
- `chunked_ce.py`: the fp32 cross-entropy of made logits, a checkpointed chunk at a time;
- `attention.py`: padding-free varlen attention for packed rows;
- `apply.py`: `apply_kernels`, the one step at setup that installs them, and `Kernels.report`,
  what each did (summary.json's `attention` and `speedups`).

The planner reads the same facts (which MLPs fuse, chunk sizes) from here, so its memory estimate
and a run's behaviour cannot drift apart.
"""

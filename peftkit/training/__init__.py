"""The training loop on accelerate and what it needs: batches, loss, optimizer, checkpoints, metrics."""

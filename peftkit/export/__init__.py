"""Export: merge adapters into deployable safetensors weights and prove they behave like the trained model."""

"""peftkit: parameter-efficient fine-tuning of causal LMs from one YAML recipe."""

from __future__ import annotations

from peftkit import _compat

_compat.quiet_bitsandbytes_cpu_kernel_warning()

__version__ = "0.1.0"

__all__ = ["__version__"]

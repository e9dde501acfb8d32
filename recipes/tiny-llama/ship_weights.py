"""Copy a pretrained tiny-llama into the package as the weights of `builtin:tiny-llama`.

    python recipes/tiny-llama/ship_weights.py runs/tiny-llama-pretrain/model

Stores the state dict in bf16 (about 6 MB) without the tied lm_head; `peftkit.models.builtin`
upcasts it into an fp32 model on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

TARGET = (
    Path(__file__).resolve().parents[2] / "peftkit" / "assets" / "tiny-llama" / "model.safetensors"
)


def main(model_dir: str) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors in {model_dir}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k: v.bfloat16().contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(
        state, str(TARGET), metadata={"format": "pt", "source": "recipes/tiny-llama/pretrain.yaml"}
    )
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 2**20:.1f} MiB, {len(state)} tensors)")


if __name__ == "__main__":
    main(*sys.argv[1:])

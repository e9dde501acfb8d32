"""Layer groups of a causal LM, top (output) to bottom (input), for gradual unfreezing and
layer-wise learning-rate decay.

Order, for a model with L decoder blocks:

    group 0        the output side: lm_head, the final norm, and every other parameter outside
                   the blocks and the input embeddings (a classification head would land here)
    group 1 .. L   the decoder blocks, from the last (L-1) to the first (0)
    group L + 1    the input embeddings (`get_input_embeddings()`, plus learned position
                   embeddings such as GPT-2's `wpe`)

Tied embeddings (`tie_word_embeddings`, e.g. builtin:tiny-llama): lm_head.weight and the input
embedding are one parameter, so they can be in one group only. It goes in the *head* group (0):
it is the output projection the loss acts on first, freezing it would freeze the head, and every
method here trains the head from step 0. So with tied embeddings the last group holds only what is
left of the embeddings (often nothing, then the group is dropped) and the embedding matrix trains
from the start at the full learning rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from peftkit.models.layers import decoder_layers

_POSITION_EMBEDDING = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)\.")


@dataclass
class LayerGroup:
    """One layer group: a label for logs and the parameters it holds."""

    label: str
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)


def layer_groups(model: nn.Module, only: set[str] | None = None) -> list[LayerGroup]:
    """The model's parameters partitioned into layer groups, top to bottom (see the module doc).

    Args:
        model: a transformers causal LM (or a peft wrapper around one).
        only: keep just these parameter names (e.g. what partial fine-tuning trains); groups left
            empty are dropped, so group 0 is always the topmost group that has something to train.

    Returns:
        Non-empty groups; every kept parameter is in exactly one (tied weights appear once, in
        the head group, as `named_parameters` lists them once).
    """
    prefix, blocks = decoder_layers(model)
    n = len(blocks)
    head = LayerGroup("head")
    layers = [LayerGroup(f"layer {i}") for i in reversed(range(n))]  # layer n-1 first
    embeddings = LayerGroup("embeddings")
    head_ids = {id(p) for p in _output_params(model)}
    input_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    block_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    for name, p in model.named_parameters():
        if only is not None and name not in only:
            continue
        match = block_re.match(name)
        if match:
            group = layers[n - 1 - int(match.group(1))]
        elif id(p) in head_ids:  # checked before the input side: a tied weight goes to the head
            group = head
        elif id(p) in input_ids or _POSITION_EMBEDDING.search(name):
            group = embeddings
        else:
            group = head
        group.names.append(name)
        group.params.append(p)
    return [g for g in (head, *layers, embeddings) if g.params]


def _output_params(model: nn.Module) -> list[nn.Parameter]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return list(out.parameters()) if out is not None else []

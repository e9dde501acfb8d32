"""The export's prompt: training's system prompt as the exported template's default system turn,
training's template variables as its defaults, and the held-out prompts rendered both ways for
the fidelity gate's client check.

A run trained with `data.system_prompt` rendered every chat without a system turn with it. The
exported chat template (chat_template.jinja, the GGUF's `tokenizer.chat_template`) gets that
prompt as its default system turn (`peftkit.data.default_system`), replacing the base template's
own default, so a runtime applying the template to a request without a system message renders
what training saw. Likewise the variables training rendered with (`data.chat_template_kwargs`,
e.g. enable_thinking: false) become the template's defaults (`with_default_variables`). A run
with neither exports its template unchanged (tools support included: the template training
rendered the tools and calls with is the one exported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftkit.data.default_system import (
    TemplateNotTransformable,
    tokenizer_renderer,
    with_default_system,
    with_default_variables,
)
from peftkit.data.pipeline import held_out_chats
from peftkit.errors import ExportError
from peftkit.export.fidelity import ClientPrompt
from peftkit.export.source import ExportSource
from peftkit.models.manifest import default_system_prompt, read_manifest, template_kwargs


@dataclass
class ExportPrompt:
    """What the export's template does with a request that has no system turn."""

    system_prompt: str | None
    how: str | None = None
    """'replaced' (the base template's own default text) or 'wrapped' (a leading block), or
    None when the template is unchanged (no system prompt)."""
    replaced_default: str | None = None
    """The base template's own default system prompt, which the export no longer uses."""
    client_prompts: list[ClientPrompt] = field(default_factory=list)
    template_variables: dict[str, Any] = field(default_factory=dict)
    """Training's `data.chat_template_kwargs`, now the exported template's defaults."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "system_prompt": self.system_prompt,
            "template_change": self.how,
            "replaced_default": self.replaced_default,
            "client_prompts": len(self.client_prompts),
            "template_variables": self.template_variables,
        }


def training_system_prompt(source: ExportSource) -> str | None:
    """The run's default system prompt: its manifest's, else (older runs) the recipe's."""
    manifest = read_manifest(source.result_dir)
    if manifest is not None and "prompt" in manifest:
        return default_system_prompt(manifest)
    return source.recipe.data.system_prompt


def apply_training_prompt(source: ExportSource, tokenizer, samples: int) -> ExportPrompt:
    """Give `tokenizer`'s chat template training's template variables as defaults and its
    system prompt as its default system turn (in place: everything the export writes from the
    tokenizer carries them), and pair up to `samples` held-out prompts as training rendered them
    and as a client's request renders now.

    Raises:
        ExportError: the template cannot be given a default system turn that renders as training.
    """
    variables = template_kwargs(read_manifest(source.result_dir)) or dict(
        source.recipe.data.chat_template_kwargs
    )
    if variables and isinstance(tokenizer.chat_template, str):  # (training rendered with them)
        tokenizer.chat_template = with_default_variables(tokenizer.chat_template, variables)
    system = training_system_prompt(source)
    if system is None or not isinstance(tokenizer.chat_template, str):
        return ExportPrompt(None, template_variables=variables)
    trained = tokenizer.chat_template
    render = tokenizer_renderer(tokenizer)
    try:
        change = with_default_system(trained, system, render)
    except TemplateNotTransformable as e:
        raise ExportError(f"data.system_prompt cannot be made the export's default: {e}") from None
    tokenizer.chat_template = change.template
    pairs = []
    if source.recipe.objective_kind.held_out_chats:  # (not preference pairs)
        for chat in held_out_chats(source.recipe.data, source.recipe.data_seed, samples):
            given = chat if chat[0]["role"] == "system" else [_system(system), *chat]
            training = _ids(tokenizer, render(trained, given, True))
            client = _ids(tokenizer, render(change.template, chat, True))
            pairs.append(ClientPrompt(training, client))
    return ExportPrompt(system, change.how, change.replaced_default, pairs, variables)


def _system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def _ids(tokenizer, text: str) -> np.ndarray:
    return np.array(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

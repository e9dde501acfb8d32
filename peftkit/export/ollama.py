"""The Ollama Modelfile's chat template: a Go template, not the Jinja one the GGUF file carries.

Ollama does not run Jinja: `ollama create` uses the Modelfile's `TEMPLATE` when there is one, else
reads the GGUF's `tokenizer.chat_template` and takes, from the templates it ships, one within a
small edit distance of it, or none (then the prompt is passed as it is, no chat turns). peftkit does not translate arbitrary Jinja into Go templates (no general translation
exists). For peftkit's own fallback template it writes the Go twin, tools included in Ollama's
style (`{{ if .Tools }}`, `{{ range .ToolCalls }}`), so a model trained with
`data.chat_template: fallback` is prompted in Ollama as in training; any other template is left to
Ollama's matching, and the Modelfile says so.

Differences that remain, named in the Modelfile: Ollama writes the tools list and a call's
arguments with Go's JSON encoder (no spaces after `:` and `,`, its own key order), where
training's `tojson` wrote Python's; the structure, the headers and the `<tool_call>` markers are
the same. (The template has
not been run by Ollama in peftkit's tests: no Ollama binary there.)
"""

from __future__ import annotations

import json

from peftkit.data.chat import FALLBACK_TEMPLATE


def _literal(text: str) -> str:
    """`text` as a Go template string constant."""
    return "{{ " + json.dumps(text) + " }}"


def fallback_go_template(bos: str | None, eos: str) -> str:
    """peftkit's fallback chat template (`FALLBACK_TEMPLATE`) as an Ollama Go template.

    `bos`: the BOS text the Jinja template writes first, or None when the GGUF's tokenizer adds
    BOS itself (then the template must not: one BOS either way); `eos`: the token after answers.
    """
    call = (
        '<tool_call>{"name": "{{ .Function.Name }}", "arguments": '
        "{{ json .Function.Arguments }}}</tool_call>"
    )
    return "".join(
        [
            _literal(bos) if bos else "",
            "{{ if .Tools }}### Tools:\n{{ range .Tools }}{{ json . }}\n{{ end }}\n{{ end }}",
            "{{ range $i, $m := .Messages }}",
            '{{ if eq .Role "system" }}{{ .Content }}\n\n',
            '{{ else if eq .Role "user" }}### User:\n{{ .Content }}\n\n',
            '{{ else if eq .Role "tool" }}### Tool result:\n{{ .Content }}\n\n',
            "{{ else }}### Assistant:\n{{ .Content }}",
            "{{ range $j, $c := .ToolCalls }}{{ if or $m.Content $j }}\n{{ end }}",
            call,
            "{{ end }}",
            _literal(eos),
            "\n\n{{ end }}{{ end }}### Assistant:\n",
        ]
    )


def is_fallback(template: str | None) -> bool:
    """Whether the exported Jinja template is peftkit's fallback (perhaps behind the leading
    blocks the export adds: the default system turn, template variables)."""
    return bool(template) and template.endswith(FALLBACK_TEMPLATE)


def template_lines(tokenizer) -> list[str]:
    """The Modelfile lines for `tokenizer`'s (the exported) chat template: a TEMPLATE for the
    fallback, else a note saying Ollama chooses."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if not is_fallback(template):
        return [
            "# TEMPLATE: none written. Ollama takes one of the chat templates it ships if it is close",
            "# to the GGUF file's Jinja template, else none (peftkit does not translate Jinja into",
            "# Go templates); chat turns and tools work in Ollama only as far as its match does.",
        ]
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
    body = fallback_go_template(None if adds_bos else tokenizer.bos_token, tokenizer.eos_token)
    return [
        "# TEMPLATE: peftkit's fallback chat template, with tools (.Tools, .ToolCalls), as",
        "# training wrote them; Ollama writes the JSON of tools and arguments its own way (no",
        "# spaces after ':' and ',', Go's key order).",
        f'TEMPLATE """{body}"""',
    ]

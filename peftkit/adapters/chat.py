"""`peftkit chat`: a multi-turn conversation with a base model and its adapters, switching adapters
on the fly. `ChatSession` keeps the conversation and answers (streaming through a callback); it
reads and prints nothing, so the command line (or a notebook) owns the terminal.
"""

from __future__ import annotations

from collections.abc import Callable

from peftkit.adapters.adapter_set import BASE, AdapterSet
from peftkit.adapters.generation import Completion, Row, SamplingOptions
from peftkit.errors import ServingError

HELP = (
    "commands: /use NAME (switch adapter; 'base' = none), /adapters, /system TEXT, /reset, "
    "/help, /quit"
)


class ChatSession:
    """A conversation with `aset`: user turns in, answers out.

    The conversation (not the adapter) is kept across /use, so the same history can be answered
    by another adapter; /reset clears it. Without a system prompt of its own (`system`, /system)
    each adapter answers with its training system prompt (`AdapterSet.system_prompt`), so /use
    swaps the instruction with the adapter.
    """

    def __init__(
        self,
        aset: AdapterSet,
        adapter: str | None,
        options: SamplingOptions,
        system: str | None = None,
    ) -> None:
        self.aset, self.adapter, self.options, self.system = aset, adapter, options, system
        self.history: list[dict[str, str]] = []

    @property
    def prompt(self) -> str:
        """The input prompt, naming the adapter in use."""
        return f"[{self.adapter or BASE}] > "

    def command(self, line: str) -> str | None:
        """Carry out a /command; returns the reply to show, or None for /quit and /exit."""
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/quit", "/exit"):
            return None
        if command == "/use":
            try:
                self.aset.activate(arg or None)  # checks the name
            except ServingError as e:
                return str(e)
            self.adapter = None if arg in ("", BASE) else arg
            return f"using {self.adapter or 'the base model (no adapter)'}"
        if command == "/adapters":
            return ", ".join([BASE, *self.aset.names])
        if command == "/system":
            self.system = arg or None
            if self.system:
                return "system prompt set"
            default = self.aset.system_prompt(self.adapter)
            return "system prompt cleared" + (
                f" (the adapter's training one applies: {default!r})" if default else ""
            )
        if command == "/reset":
            self.history.clear()
            return "conversation cleared"
        return HELP

    def answer(self, line: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer a user turn with the adapter in use, passing each new piece of text to
        `on_text` as it is generated; the turn and its answer join the conversation."""
        self.history.append({"role": "user", "content": line})
        messages = (
            [{"role": "system", "content": self.system}] if self.system else []
        ) + self.history
        aset, adapter = self.aset, self.adapter
        row = Row(
            aset.encode(messages, adapter), adapter, self.options, aset.stop_ids(adapter), on_text
        )
        (completion,) = aset.generate_rows([row])
        self.history.append({"role": "assistant", "content": completion.text})
        return completion

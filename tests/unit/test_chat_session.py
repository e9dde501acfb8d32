"""`ChatSession` (peftkit chat's library side): commands return their replies, answers stream
through a callback and join the conversation, and nothing is printed (only the CLI prints)."""

from __future__ import annotations

from peftkit.adapters.chat import HELP, ChatSession
from peftkit.adapters.generation import Completion, SamplingOptions
from peftkit.errors import ServingError


class FakeAdapters:
    """Stands in for an AdapterSet: answers "<adapter>:<turns in the conversation>"."""

    names = ["sql", "support"]

    def __init__(self) -> None:
        self.active: str | None = None

    def activate(self, name: str | None) -> None:
        if name not in (None, "base", *self.names):
            raise ServingError(f"no adapter named {name!r}")
        self.active = None if name == "base" else name

    def encode(self, messages, adapter, tools=None):
        return messages

    def chat_template(self, adapter):
        return "{{ messages }}"  # neither tools nor <think>: answers are plain text

    def stop_ids(self, adapter):
        return set()

    def system_prompt(self, adapter):
        return None

    def generate_rows(self, rows):
        (row,) = rows
        text = f"{row.adapter}:{len(row.input_ids)}"
        for piece in (text[:2], text[2:]) if row.on_text else ():
            row.on_text(piece)
        return [Completion(text, [], len(row.input_ids), "stop")]


def test_commands_reply_and_answers_stream_into_the_conversation(capsys):
    session = ChatSession(FakeAdapters(), "sql", SamplingOptions(), system="be brief")
    assert session.prompt == "[sql] > "
    streamed: list[str] = []
    assert session.answer("hi", on_text=streamed.append).text == "sql:2"  # system + user
    assert "".join(streamed) == "sql:2" and len(streamed) == 2
    assert session.command("/use nowhere") == "no adapter named 'nowhere'"
    assert session.prompt == "[sql] > "  # a refused switch keeps the adapter
    assert session.command("/use support") == "using support"
    assert session.answer("again").text == "support:4"  # the conversation is kept across /use
    assert session.command("/use base") == "using the base model (no adapter)"
    assert session.prompt == "[base] > "
    assert session.command("/adapters") == "base, sql, support"
    assert session.command("/system") == "system prompt cleared"
    assert session.command("/reset") == "conversation cleared" and session.history == []
    assert session.command("/what") == HELP
    assert session.command("/quit") is None and session.command("/exit") is None
    assert capsys.readouterr() == ("", "")

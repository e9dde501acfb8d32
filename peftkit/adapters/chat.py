"""`peftkit chat`: an interactive, multi-turn conversation, streamed, switching adapters on the fly."""

from __future__ import annotations

from collections.abc import Callable

from peftkit.adapters.adapter_set import BASE, AdapterSet
from peftkit.adapters.generation import Row, SamplingOptions
from peftkit.errors import ServingError

HELP = (
    "commands: /use NAME (switch adapter; 'base' = none), /adapters, /system TEXT, /reset, "
    "/help, /quit"
)


def chat_loop(
    aset: AdapterSet,
    adapter: str | None,
    options: SamplingOptions,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> None:
    """Read user turns until /quit or end of input; stream each answer as it is generated.

    The conversation (not the adapter) is kept across /use, so the same history can be answered
    by another adapter; /reset clears it.
    """
    history: list[dict[str, str]] = []
    write(f"{HELP}\n")
    while True:
        try:
            line = read(f"[{adapter or BASE}] > ").strip()
        except EOFError:
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            if command in ("/quit", "/exit"):
                return
            if command == "/use":
                try:
                    aset.activate(arg or None)  # checks the name
                    adapter = None if arg in ("", BASE) else arg
                    write(f"using {adapter or 'the base model (no adapter)'}\n")
                except ServingError as e:
                    write(f"{e}\n")
            elif command == "/adapters":
                write(", ".join([BASE, *aset.names]) + "\n")
            elif command == "/system":
                system = arg or None
                write("system prompt set\n" if system else "system prompt cleared\n")
            elif command == "/reset":
                history.clear()
                write("conversation cleared\n")
            else:
                write(f"{HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        row = Row(aset.encode(messages, adapter), adapter, options, aset.stop_ids(adapter), write)
        (completion,) = aset.generate_rows([row])
        write("\n")
        history.append({"role": "assistant", "content": completion.text})

"""`peftkit serve`: the OpenAI-compatible server (app, engine, protocol, security, server)."""

from typing import Literal

SpecialTokens = Literal["escape", "refuse", "allow"]
"""What `peftkit serve` does with the chat template's special tokens inside message content
(`peftkit.serving.security.encode_chat`); light enough for `peftkit.api` to import."""

"""Loading base models and tokenizers (hub ids, local folders, the built-in quickstart model)."""

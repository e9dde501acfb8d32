"""Errors peftkit raises for things a user can fix. The CLI prints them without a traceback."""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class RecipeError(PeftkitError):
    """The recipe is not valid: unknown key, wrong type, or settings that do not go together."""


class RemoteCodeNotTrusted(RecipeError):
    """A recipe read from a run directory asks for the model's own code (`trust_remote_code`)
    but the command line that read it did not pass --trust-remote-code."""


class DataError(PeftkitError):
    """A data source is missing, malformed, empty, or yields no supervised tokens."""


class ModelLoadError(PeftkitError):
    """The base model or tokenizer could not be loaded."""


class RunDirError(PeftkitError):
    """The run directory is in a state that the requested action would damage."""


class TrainingStopped(PeftkitError):
    """Training stopped on a non-finite loss or out-of-memory; the last good checkpoint is kept."""


class ExportError(PeftkitError):
    """The export cannot be made: missing or mismatched files, a method that cannot be served, ..."""


class FidelityGateFailed(ExportError):
    """The exported model differs from the trained model by more than the recipe's thresholds."""


class AdapterMismatchError(PeftkitError):
    """An adapter was trained on another base model or tokenizer than the one it is loaded onto."""


class ServingError(PeftkitError):
    """An adapter cannot be served or generated with as asked (unknown name, unsupported method)."""


class SweepError(PeftkitError):
    """A sweep cannot run as asked: a search space that does not fit the recipe, a used folder, ..."""


class UnsupportedGGUFExport(ExportError):
    """The model or tokenizer cannot be written as GGUF: architecture, RoPE variant or tokenizer."""

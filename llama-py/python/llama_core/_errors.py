"""Exceptions raised by llama_core (the native module raises these classes)."""


class LlamaError(Exception):
    """Base class of every llama_core error."""


class ModelLoadError(LlamaError):
    """The model files are invalid, truncated, or of an unsupported architecture or type."""


class TokenizerError(LlamaError):
    """Tokenization or detokenization failed."""


class ChatTemplateError(LlamaError):
    """The chat template is missing, invalid, or raised an exception."""


class ContextOverflowError(LlamaError):
    """The tokens do not fit in the session's context."""


class GenerationCancelled(LlamaError):
    """The operation was cancelled with Session.cancel()."""


class SessionStateError(LlamaError):
    """Saved session data is corrupted or belongs to another model."""


class InvalidArgumentError(LlamaError, ValueError):
    """An argument is out of range or of the wrong kind."""


class ConstraintError(LlamaError, ValueError):
    """A JSON schema, grammar, regular expression, choice list or tool is invalid."""

"""llama_core: run Llama-family language models (GGUF files or Hugging Face folders) locally.

>>> import llama_core
>>> model = llama_core.Model.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
>>> with model.session() as s:                                          # doctest: +SKIP
...     print(s.chat([{"role": "user", "content": "Hi!"}], sampler=llama_core.Sampler(seed=7)))
"""

import logging as _logging

from ._errors import (
    ChatTemplateError,
    ConstraintError,
    ContextOverflowError,
    GenerationCancelled,
    InvalidArgumentError,
    LlamaError,
    ModelLoadError,
    SessionStateError,
    TokenizerError,
)
from ._native import Adapter, Batch, Model, Sampler, Session, TokenStream, __version__, finetune

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "Adapter",
    "Batch",
    "ChatTemplateError",
    "ConstraintError",
    "ContextOverflowError",
    "GenerationCancelled",
    "InvalidArgumentError",
    "LlamaError",
    "Model",
    "ModelLoadError",
    "Sampler",
    "Session",
    "SessionStateError",
    "TokenStream",
    "TokenizerError",
    "__version__",
    "finetune",
]

"""Type stubs of the native module (checked against it by `python -m mypy.stubtest`)."""

import os
from typing import Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt
from typing_extensions import TypedDict, Unpack

__version__: str
__all__ = ["Model", "Adapter", "Session", "TokenStream", "Sampler", "Batch", "_restore_session", "finetune", "__version__"]

_Message = Mapping[str, object]
_Prompt = Union[str, Sequence[int]]

class _Constraint(TypedDict, total=False):
    """What the output must match (at most one of response_format, grammar, regex, choices; see
    `Session.generate`), and speculative decoding: `draft` (a Model with the same vocabulary, or
    "lookup") or `prediction` (the expected text), with `draft_max` tokens per verification at
    most. The output is the same with or without speculation."""

    response_format: Optional[Mapping[str, object]]
    grammar: Optional[str]
    regex: Optional[str]
    choices: Optional[Sequence[str]]
    draft: Optional[Union[Model, Literal["lookup"]]]
    prediction: Optional[str]
    draft_max: int

class _ChatOptions(_Constraint, total=False):
    """A constraint, and the tools a conversation offers (see `Session.chat`)."""

    tools: Optional[Sequence[Mapping[str, object]]]
    tool_choice: Optional[Union[str, Mapping[str, object]]]
    parse_special_in_content: bool

@final
class Model:
    @staticmethod
    def load(
        path: Union[str, os.PathLike[str]],
        *,
        progress: bool = False,
        quantize: Optional[str] = None,
        threads: int = 0,
        kernel: str = "auto",
    ) -> Model: ...
    def session(
        self,
        n_ctx: int = 0,
        n_batch: int = 512,
        kv_type: Literal["f16", "f32", "q8_0", "q4_0"] = "f16",
        context_shift: Optional[int] = None,
        threads: int = 0,
        kv_type_k: Optional[Literal["f16", "f32", "q8_0", "q4_0"]] = None,
        kv_type_v: Optional[Literal["f16", "f32", "q8_0", "q4_0"]] = None,
    ) -> Session: ...
    def generate_batch(
        self,
        prompts: Sequence[Union[str, Sequence[int], Sequence[_Message]]],
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        stop: Optional[Sequence[str]] = None,
        **options: Unpack[_ChatOptions],
    ) -> List[str]: ...
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> List[int]: ...
    def detokenize(self, ids: Sequence[int], special: bool = False) -> str: ...
    def apply_chat_template(self, messages: Sequence[_Message], add_generation_prompt: bool = True) -> str: ...
    def embed(self, text: str, pooling: str = "mean") -> npt.NDArray[np.float32]: ...
    def is_eog(self, token: int) -> bool: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def n_ctx_train(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def weight_type(self) -> str: ...
    @property
    def kernel(self) -> str: ...
    @property
    def threads(self) -> int: ...
    def load_adapter(self, path: Union[str, "os.PathLike[str]"]) -> Adapter: ...
    @property
    def format(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def chat_template(self) -> Optional[str]: ...
    @property
    def eog_ids(self) -> List[int]: ...

@final
class Adapter:
    @property
    def path(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def targets(self) -> List[str]: ...
    @property
    def n_matrices(self) -> int: ...
    @property
    def max_rank(self) -> int: ...
    @property
    def alpha(self) -> Optional[float]: ...

@final
class Sampler:
    def __new__(
        cls,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[Dict[int, float]] = None,
        seed: Optional[int] = None,
    ) -> Sampler: ...
    @staticmethod
    def greedy() -> Sampler: ...
    def sample(self, session: Session) -> int: ...

@final
class Session:
    def eval(self, tokens: Sequence[int]) -> None: ...
    def logits(self) -> Optional[npt.NDArray[np.float32]]: ...
    def top_logprobs(self, k: int = 5) -> List[Tuple[int, float]]: ...
    @property
    def tokens(self) -> List[int]: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def kv_cache_bytes(self) -> int: ...
    @property
    def model(self) -> Model: ...
    def __len__(self) -> int: ...
    def generate(
        self,
        prompt: _Prompt,
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        stop: Optional[Sequence[str]] = None,
        logprobs: Optional[int] = None,
        **options: Unpack[_Constraint],
    ) -> str: ...
    def stream(
        self,
        prompt: _Prompt,
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        stop: Optional[Sequence[str]] = None,
        **options: Unpack[_Constraint],
    ) -> TokenStream: ...
    def chat(
        self,
        messages: Sequence[_Message],
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        stop: Optional[Sequence[str]] = None,
        **options: Unpack[_ChatOptions],
    ) -> str: ...
    def chat_stream(
        self,
        messages: Sequence[_Message],
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        stop: Optional[Sequence[str]] = None,
        **options: Unpack[_ChatOptions],
    ) -> TokenStream: ...
    @property
    def last_generation(self) -> Optional[Dict[str, object]]: ...
    def fork(self) -> Session: ...
    def set_adapters(self, adapters: Sequence[Tuple[Adapter, float]]) -> None: ...
    @property
    def adapters(self) -> List[Tuple[Adapter, float]]: ...
    def truncate(self, n: int) -> None: ...
    def cancel(self) -> None: ...
    def save_state(self, sampler: Optional[Sampler] = None) -> bytes: ...
    @staticmethod
    def restore(
        model: Model,
        data: bytes,
        kv_type: Optional[str] = None,
        kv_type_k: Optional[str] = None,
        kv_type_v: Optional[str] = None,
    ) -> Tuple[Session, Optional[Sampler]]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Session: ...
    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool: ...

@final
class Batch:
    def __new__(cls, model: Model) -> Batch: ...
    def add(
        self,
        prompt: Union[str, Sequence[int], Sequence[_Message]],
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        stop: Optional[Sequence[str]] = None,
        *,
        n_ctx: int = 0,
        **options: Unpack[_ChatOptions],
    ) -> int: ...
    def step(self) -> List[Tuple[int, str]]: ...
    def finished(self) -> Dict[int, Dict[str, object]]: ...
    def cancel(self, id: int) -> bool: ...
    def __len__(self) -> int: ...

@final
class TokenStream(Iterator[str]):
    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...

def _restore_session(model: Model, data: bytes) -> Session: ...
def finetune(
    model: Model,
    data: Union[str, "os.PathLike[str]"],
    *,
    out: Optional[Union[str, "os.PathLike[str]"]] = None,
    eval: Optional[Union[str, "os.PathLike[str]"]] = None,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Optional[Sequence[str]] = None,
    rslora: bool = False,
    epochs: int = 1,
    lr: float = 2e-4,
    batch: int = 1,
    grad_accum: int = 1,
    max_len: int = 512,
    warmup: int = 0,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    seed: int = 0,
    eval_every: int = 50,
    teacher: Optional[Model] = None,
    top_k: int = 32,
    pack: bool = False,
    progress: Optional[Union[bool, Callable[[Dict[str, object]], Optional[bool]]]] = None,
) -> Adapter: ...

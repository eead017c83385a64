import json
import os
import pathlib
import subprocess

import pytest

import llama_core

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _model_path() -> str:
    p = os.environ.get("LLAMA_TEST_MODEL")
    if p:
        return p
    cache = os.environ.get("LLAMA_CORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama-core"
    )
    path = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path), f"{path} is missing: run scripts/fetch-model.sh"
    return path


@pytest.fixture(scope="session")
def model_path() -> str:
    return _model_path()


@pytest.fixture(scope="session")
def model(model_path):
    return llama_core.Model.load(model_path)


@pytest.fixture(scope="session")
def reference():
    return json.loads((ROOT / "tests" / "reference" / "smollm2.json").read_text())


@pytest.fixture(scope="session")
def llama_bin() -> str:
    """The `llama` CLI (the Rust API's results, for token-for-token comparisons)."""
    b = os.environ.get("LLAMA_BIN", str(ROOT / "target" / "debug" / "llama"))
    assert os.path.isfile(b), f"{b} is missing: build it with `cargo build -p llama-examples`"
    return b


def rust_greedy(llama_bin: str, model_path: str, prompt: str, n: int):
    out = subprocess.run(
        [llama_bin, "generate", "--model", model_path, "--prompt", prompt, "--temperature", "0", "--max-tokens", str(n), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)

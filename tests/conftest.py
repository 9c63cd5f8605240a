"""Shared fixtures: tiny random models (fast, any architecture) and the bundled ones (real behaviour)."""
from __future__ import annotations

import pytest
import torch

from course_lib.models import load_model
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than the maths, and the machine is shared (use per module)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return make_tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def storyteller():
    """(model, tokenizer) of the bundled GPT-2 storyteller on the CPU."""
    return load_model("storyteller", device="cpu")


@pytest.fixture(scope="session")
def llama_model():
    """(model, tokenizer) of the bundled Llama-architecture model on the CPU."""
    return load_model("llama", device="cpu")

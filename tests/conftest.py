import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from memory3.model.config import Memory3Config
from memory3.model.init import random_model
from memory3.model.tokenizer import TextCodec, byte_level_tokenizer


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    yield


@pytest.fixture(scope="session")
def tiny_config() -> Memory3Config:
    return Memory3Config.from_name("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    # A larger init than training would use, so that attention is far from uniform and
    # a wrong mask or position changes the outputs visibly.
    return random_model(tiny_config, seed=1, std=0.2)


@pytest.fixture(scope="session")
def text_codec() -> TextCodec:
    return TextCodec(byte_level_tokenizer())


@pytest.fixture(scope="session")
def prefix(text_codec, tiny_config) -> list[int]:
    return text_codec.reference_prefix(tiny_config)


@pytest.fixture
def cpu_compiler():
    """torch.compile on the CPU builds C++ that includes Python.h: it needs g++ and the Python headers."""
    if shutil.which("g++") is None or not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        pytest.skip("torch.compile on the CPU needs g++ and the Python headers (apt: g++ python3-dev)")

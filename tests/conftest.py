import pytest

from dllm_decode.plugins import get_plugin_manager
from dllm_decode.testing import RandomLogitsModel


@pytest.fixture
def pm():
    return get_plugin_manager()


@pytest.fixture(scope="session")
def stub_model():
    return RandomLogitsModel(vocab_size=48, dim=16, seed=0)

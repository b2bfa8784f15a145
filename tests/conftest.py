import pytest
import torch

from dllm_decode.plugins import get_plugin_manager
from dllm_decode.testing import RandomLogitsModel


@pytest.fixture
def pm():
    return get_plugin_manager()


@pytest.fixture(scope="session")
def stub_model():
    return RandomLogitsModel(vocab_size=48, dim=16, seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One BLAS thread for a module: the test machine's two cores are shared with other jobs,
    and oversubscribed threads spin. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

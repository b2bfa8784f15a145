import os

import pytest
import torch

from dllm_decode.plugins import get_plugin_manager
from dllm_decode.testing import RandomLogitsModel

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    # Under pytest-xdist the workers share the cores: more BLAS threads than cores only spin
    # against each other. A lone worker (-n 1) keeps torch's default.
    torch.set_num_threads(max(1, torch.get_num_threads() // _workers))


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


@pytest.fixture(scope="session")
def tiny_llada():
    """A tiny random LLaDA in float64 (32-token vocabulary, mask 31, EOS 1, pad 0) for the parity
    tests of select rules; test_llada_parity.py keeps its own, with a larger vocabulary."""
    from dllm_decode.models import build_random_model

    return build_random_model("llada", vocab_size=32, d_model=32, n_layers=2, n_heads=4, mask_token_id=31,
                              eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def tiny_dream():
    """A tiny random Dream in float64 (32-token vocabulary, mask 31, EOS 1, pad 0) for the Dream
    parity tests (test_elastic_parity.py keeps its own, with three layers)."""
    from dllm_decode.models import build_random_model

    return build_random_model("dream", vocab_size=32, d_model=32, n_layers=2, n_heads=4, mask_token_id=31,
                              eos_token_id=1, pad_token_id=0, seed=4, dtype=torch.float64).eval()


@pytest.fixture(scope="session")
def tiny_pair():
    """Tiny random LLaDA and Dream models in float64 (48-token vocabulary, mask 47, EOS 1, pad 0,
    seed 4) for the subset-cache parity tests (dKV-Cache, d2Cache): {"llada": ..., "dream": ...}."""
    from dllm_decode.models import build_random_model

    return {family: build_random_model(family, vocab_size=48, d_model=32, n_layers=2, n_heads=4,
                                       n_kv_heads=4 if family == "llada" else 2, mask_token_id=47,
                                       eos_token_id=1, pad_token_id=0, seed=4, dtype=torch.float64).eval()
            for family in ("llada", "dream")}

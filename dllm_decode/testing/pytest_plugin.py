"""pytest fixtures for plugin authors (opt-in, so installing dllm-decode changes no one's tests).

Enable them in your ``conftest.py``::

    pytest_plugins = ["dllm_decode.testing.pytest_plugin"]

or on the command line with ``pytest -p dllm_decode.testing.pytest_plugin``. Then::

    def test_my_policy(dllm_kit):
        dllm_kit.check_invariants({"policy": "llada", "select_tokens": "my_policy"})
        dllm_kit.check_parity("recipes/my-policy.yaml", my_reference)

Fixtures: ``dllm_kit`` (a fresh :class:`dllm_decode.testing.PluginKit` per test, over the
random-logits stand-in model) and ``random_logits_model`` (one per session).
"""

from __future__ import annotations

import pytest

from dllm_decode.testing import PluginKit, RandomLogitsModel


@pytest.fixture(scope="session")
def random_logits_model() -> RandomLogitsModel:
    """The cheap deterministic stand-in denoiser (48-token vocabulary, mask id 47, float64)."""
    return RandomLogitsModel()


@pytest.fixture
def dllm_kit(random_logits_model: RandomLogitsModel) -> PluginKit:
    """A :class:`PluginKit` for one test; ``dllm_kit.register(name, module)`` adds a plugin that is
    not installed (or replaces the installed copy)."""
    return PluginKit(model=random_logits_model)

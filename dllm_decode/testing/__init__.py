"""The plugin author's kit: a stand-in model, the invariant suite and parity checks (kit.py),
and opt-in pytest fixtures (``pytest_plugins = ["dllm_decode.testing.pytest_plugin"]``)."""

from dllm_decode.testing.kit import (InvariantViolation, ParityMismatch, PluginKit, RandomLogitsModel,
                                     ReferenceFn, ReferenceOutput, StubSpec, check_invariants,
                                     check_parity, default_prompts, invariant_cases)

__all__ = ["InvariantViolation", "ParityMismatch", "PluginKit", "RandomLogitsModel", "ReferenceFn",
           "ReferenceOutput", "StubSpec", "check_invariants", "check_parity", "default_prompts",
           "invariant_cases"]

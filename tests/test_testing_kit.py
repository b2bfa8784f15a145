"""The plugin author's kit (dllm_decode.testing, dllm_decode.testing.pytest_plugin) passes a correct
plugin and fails a wrong one, with messages that say where."""

import pytest
import torch

from dllm_decode.hookspecs import hookimpl
from dllm_decode.plugins import PluginMeta, PluginOptions
from dllm_decode.testing import (InvariantViolation, ParityMismatch, PluginKit, RandomLogitsModel,
                                 ReferenceOutput, check_invariants, check_parity)

pytest_plugins = ["pytester"]

MODEL = RandomLogitsModel(vocab_size=48, seed=5)
PROMPTS = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18]]
RECIPE = {"policy": "llada", "select_tokens": {"plugin": "threshold", "threshold": 0.6},
          "generation": {"gen_length": 12, "block_length": 6}}


def threshold_reference(model, prompt, recipe):
    """Fast-dLLM's threshold rule over LLaDA blocks, one prompt, plain loops (T = 0)."""
    mask, gen = model.spec.mask_token_id, recipe.generation
    x = torch.tensor([prompt + [mask] * gen.gen_length])
    nfe, P = 0, len(prompt)
    for lo in range(P, P + gen.gen_length, gen.block_length):
        while (x[0, lo:lo + gen.block_length] == mask).any():
            logits = model(x)[0].clone()
            nfe += 1
            logits[:, mask] = float("-inf")
            probs = torch.softmax(logits.double(), -1)
            cols = [c for c in range(lo, lo + gen.block_length) if x[0, c] == mask]
            conf = {c: float(probs[c].max()) for c in cols}
            take = [c for c in cols if conf[c] >= 0.6] or [max(cols, key=lambda c: (conf[c], -c))]
            for c in take:
                x[0, c] = int(logits[c].argmax())
    return ReferenceOutput(tokens=x[0, P:].tolist(), nfe=nfe)


class ThresholdOptions(PluginOptions):
    threshold: float = 0.9


class LeftmostFallback:
    """Threshold decoding that, when nothing passes, takes the leftmost mask instead of the best."""

    dllm_meta = PluginMeta(options=ThresholdOptions)

    @hookimpl
    def select_tokens(self, candidates, options):
        over = (candidates.confidence >= options.threshold) & candidates.eligible
        first = candidates.eligible & (candidates.eligible.long().cumsum(1) == 1)
        return torch.where(over.any(1, keepdim=True), over, first)


class GlobalRandom:
    """Draws from torch's global generator instead of state.generator: not reproducible."""

    @hookimpl
    def select_tokens(self, candidates):
        noise = torch.rand(candidates.confidence.shape, dtype=torch.float64)
        keys = torch.where(candidates.eligible, noise, float("-inf"))
        return candidates.eligible & (keys == keys.max(1, keepdim=True).values)


def test_parity_passes_a_correct_plugin():
    result = check_parity(MODEL, RECIPE, threshold_reference, PROMPTS)
    assert len(result.rows) == 3
    check_parity(MODEL, RECIPE, threshold_reference, PROMPTS, batched=False)


def test_parity_names_the_first_difference():
    kit = PluginKit(model=MODEL).register("threshold", LeftmostFallback())
    with pytest.raises(ParityMismatch, match=r"row \d .* differs from the reference at generated position \d+"):
        kit.check_parity(RECIPE, threshold_reference, PROMPTS)


def test_parity_checks_forward_counts():
    def plus_one(model, prompt, recipe):
        ref = threshold_reference(model, prompt, recipe)
        return ReferenceOutput(ref.tokens, ref.nfe + 1)

    with pytest.raises(ParityMismatch, match="forwards"):
        check_parity(MODEL, RECIPE, plus_one, PROMPTS)


def test_parity_refuses_a_short_reference():
    with pytest.raises(ParityMismatch, match="whole generated region"):
        check_parity(MODEL, RECIPE, lambda m, p, r: [0, 1], PROMPTS)


def test_invariants_catch_a_plugin_that_ignores_the_seed():
    kit = PluginKit(model=MODEL).register("global_random", GlobalRandom())
    with pytest.raises(AssertionError, match="different tokens"):
        kit.check_invariants({"policy": "llada", "select_tokens": "global_random",
                              "generation": {"gen_length": 8}})


def test_the_kit_replaces_an_installed_plugin_of_the_same_name():
    kit = PluginKit(model=MODEL).register("threshold", LeftmostFallback())
    assert isinstance(kit.plugin_manager().get_plugin("threshold"), LeftmostFallback)
    check_invariants(MODEL, RECIPE, PROMPTS, pm=kit.plugin_manager())
    assert issubclass(ParityMismatch, AssertionError) and issubclass(InvariantViolation, AssertionError)


def test_pytest_fixtures(pytester):
    pytester.makeconftest('pytest_plugins = ["dllm_decode.testing.pytest_plugin"]')
    pytester.makepyfile("""
        from dllm_decode.hookspecs import hookimpl
        from dllm_decode.testing import PluginKit

        class EveryMask:
            @hookimpl
            def select_tokens(self, candidates):
                return candidates.eligible

        def test_kit(dllm_kit, random_logits_model):
            assert isinstance(dllm_kit, PluginKit) and dllm_kit.model is random_logits_model
            dllm_kit.register("every_mask", EveryMask())
            dllm_kit.check_invariants({"policy": "llada", "select_tokens": "every_mask",
                                       "generation": {"gen_length": 8}})
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_kit_registers_its_plugins_through_the_checks_installed_ones_pass():
    """A kit plugin with an unreadable meta or no hook is refused by name, as an installed one is,
    instead of half-working under the invariant suite."""
    import types

    from dllm_decode import PluginMeta
    from dllm_decode.errors import PluginError
    from dllm_decode.testing import PluginKit

    with pytest.raises(PluginError, match="'hookless' .* implements no"):
        PluginKit().register("hookless", types.SimpleNamespace(dllm_meta=PluginMeta())).plugin_manager()
    with pytest.raises(PluginError, match="'named'.*string"):
        PluginKit().register("named", "my_select").plugin_manager()

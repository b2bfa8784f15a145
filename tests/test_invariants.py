"""The invariant suite over random logits (hypothesis) and for every registered plugin."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllm_decode.config import recipe_from_dict
from dllm_decode.errors import InputError
from dllm_decode.plugins import get_plugin_manager, list_plugins, meta_of
from dllm_decode.testing import InvariantViolation, RandomLogitsModel, check_invariants, invariant_cases

MODEL = RandomLogitsModel(vocab_size=48, seed=11)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(case=invariant_cases(vocab_size=48), steps_div=st.sampled_from([1, 2]),
       remasking=st.sampled_from(["low_confidence", "random"]), eos=st.booleans(), cfg=st.sampled_from([0.0, 1.0]))
def test_llada_keeps_every_invariant(case, steps_div, remasking, eos, cfg):
    prompts, gen, block = case
    steps = max(gen // steps_div, gen // block)
    steps -= steps % (gen // block)
    recipe = {"policy": {"plugin": "llada", "remasking": remasking},
              "generation": {"gen_length": gen, "block_length": block, "steps": steps, "cfg_scale": cfg,
                             "eos": {"stop": eos, "deprioritize": eos}}}
    check_invariants(MODEL, recipe, prompts)


@FAST
@given(case=invariant_cases(vocab_size=48), temperature=st.sampled_from([0.5, 1.0]), seed=st.integers(0, 5))
def test_sampling_is_reproducible_for_a_seed(case, temperature, seed):
    prompts, gen, block = case
    recipe = {"policy": "llada", "generation": {"gen_length": gen, "block_length": block, "steps": gen,
                                                "temperature": temperature, "seed": seed}}
    check_invariants(MODEL, recipe, prompts)   # the batch check holds when sampling too


def _plugin_slot_pairs():
    """This distribution's own plugins: an installed third-party plugin is its author's to test."""
    pm = get_plugin_manager()
    return [(info.name, slot) for info in list_plugins(pm) if info.distribution == "dllm-decode"
            for slot in info.slots]


def test_only_this_distributions_plugins_are_collected(tmp_path, monkeypatch):
    from fake_dist import install_fake_distribution

    plugin = "from dllm_decode.hookspecs import hookimpl\n\n@hookimpl\ndef select_tokens(state, candidates):\n" \
             "    return candidates.eligible\n"
    monkeypatch.syspath_prepend(str(install_fake_distribution(tmp_path, "someone-elses-plugins",
                                                              {"theirs": "their_policy"}, {"their_policy": plugin})))
    assert get_plugin_manager().get_plugin("theirs") is not None
    pairs = _plugin_slot_pairs()
    assert ("llada", "select_tokens") in pairs and not any(name == "theirs" for name, _ in pairs)


def _tiny_llada():
    import torch

    from dllm_decode.models import build_random_model

    return build_random_model("llada", vocab_size=48, d_model=32, n_layers=2, n_heads=4, mask_token_id=47,
                              eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64).eval()


def _tiny_sdar():
    import torch

    from dllm_decode.models import build_random_model

    return build_random_model("sdar", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mask_token_id=47,
                              eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64, block_size=4).eval()


@pytest.fixture(scope="module")
def tiny_verifier(tmp_path_factory):
    """An autoregressive verifier for apd, sharing the 48-token vocabulary of the models below."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("verifier")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


#: what a plugin needs besides the slot under test: required parameters, and the slots its hooks
#: depend on each other for (apd verifies the drafts of its own score hook)
NEEDS = {"apd": lambda verifier, slot: {"params": {"verifier": verifier},
                                        "with": {"score": "apd"} if slot == "select_tokens" else {}},
         # the out-of-span cache acts on SlowFast's per-row phases
         "slowfast_tail": lambda verifier, slot: {"params": {}, "with": {"policy": "slowfast", "score": "llada"}},
         # prophet decides on the gap its score measures; wino verifies with the shadow block its
         # cache_policy adds and its score reads
         "prophet": lambda verifier, slot: {"params": {}, "with": {"score": "prophet"} if slot == "select_tokens" else {}},
         # d2cache's cache ranks masks by the first forward's confidence its score keeps
         "d2cache": lambda verifier, slot: {"params": {}, "with": {"score": "d2cache"} if slot == "cache_policy" else {}},
         # daedal's selection and canvas rule read its own score's EOS confidence and stages; the
         # untrained models never predict EOS, so rows grow to max_gen_length
         "daedal": lambda verifier, slot: {"params": {"max_gen_length": 24},
                                           "with": {s: "daedal" for s in ("score", "select_tokens", "resize_canvas")
                                                    if s != slot} if slot != "choose_span" else {}},
         # klass commits on the KL history its score keeps
         "klass": lambda verifier, slot: {"params": {}, "with": {"score": "klass"} if slot == "select_tokens" else {}},
         "wino": lambda verifier, slot: {"params": {}, "with": {"score": {"cache_policy": "wino"},
                                                                "select_tokens": {"cache_policy": "wino", "score": "wino"}}
                                         .get(slot, {})}}


@pytest.mark.parametrize("model", [MODEL, _tiny_llada()], ids=["random-logits", "tiny-llada"])
@pytest.mark.parametrize("plugin,slot", _plugin_slot_pairs())
def test_every_registered_plugin_in_every_slot_it_fills(plugin, slot, model, tiny_verifier):
    need = NEEDS[plugin](tiny_verifier, slot) if plugin in NEEDS else {"params": {}, "with": {}}
    entry = {"plugin": plugin, **need["params"]}
    recipe = {"policy": "llada", slot: entry, **{s: {"plugin": p, **need["params"]} for s, p in need["with"].items()},
              "generation": {"gen_length": 16, "block_length": 8, "steps": 16}}
    requires = meta_of(get_plugin_manager().get_plugin(plugin)).requires
    if "block_causal" in requires and not isinstance(model, RandomLogitsModel):
        model, recipe["generation"]["block_length"] = _tiny_sdar(), 4      # decoded block by block
    if "compute_plans" in requires and isinstance(model, RandomLogitsModel):
        with pytest.raises(InputError, match=plugin):       # a clear refusal, before any forward
            check_invariants(model, recipe)
        return
    check_invariants(model, recipe)
    check_invariants(model, recipe, prompts=[[5, 6, 7]])


def test_the_suite_catches_a_broken_plugin():
    from dllm_decode.hookspecs import hookimpl

    class Sticky:
        """Spans that ignore the block: the engine accepts them, the batch check must not."""

        @hookimpl
        def select_tokens(self, state, candidates):
            conf = candidates.confidence
            # picks by column when the row is padded: output depends on padding
            pad = (~state.attention_mask).sum(1, keepdim=True)
            col = state.columns[None, :] - pad
            return candidates.eligible & (col == col.masked_fill(~candidates.eligible, 10 ** 6).min(1, keepdim=True).values) \
                if bool((pad == 0).all()) else candidates.eligible & (conf == conf.max(1, keepdim=True).values)

    pm = get_plugin_manager(extra_plugins={"sticky": Sticky()})
    with pytest.raises(InvariantViolation, match="differs from the row alone"):
        check_invariants(MODEL, {"policy": "llada", "select_tokens": "sticky",
                                 "generation": {"gen_length": 8, "steps": 8}}, pm=pm)

"""The wino plugin reproduces WINO's wide-in narrow-out decoding token for token at T = 0
(float64) against tests/reference_wino.py, whose shadow-block forward builds its attention
matrix independently of the plan executor: forwards, re-masks and tokens agree row by row inside
a padded batch of 4, on a tiny random LLaDA and on the shipped llada-reference. The executor's
shadow queries are checked against that forward directly, and Dream models are refused."""

from pathlib import Path

import pytest
import torch

from dllm_decode.config import load_recipe, recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import RecipeError
from dllm_decode.models import ComputePlan, build_random_model
from dllm_decode.testing import check_invariants
from reference_forward import weights
from reference_wino import shadow_forward, wino_generate
from shipped import shipped_model_and_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def _tiny(family="llada", seed=3):
    return build_random_model(family, vocab_size=48, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=4 if family == "llada" else 2, mask_token_id=47, eos_token_id=1,
                              pad_token_id=0, seed=seed, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _recipe(gen, block, batch, **policy):
    return recipe_from_dict({"policy": {"plugin": "wino", **policy},
                             "generation": {"gen_length": gen, "block_length": block, "batch_size": batch,
                                            "dtype": "float64"}})


def _remasks(state):
    """(B,) re-masks per row from the engine's log."""
    n = torch.zeros(state.batch_size, dtype=torch.long)
    for _, where in state.remask_log:
        n += torch.bincount(where[:, 0], minlength=state.batch_size)
    return n.tolist()


def test_shadow_queries_match_the_naive_forward(tiny):
    """Padded batch, a different block per row: the shadow logits equal the explicit forward's,
    and the canvas logits are those of the plan without shadows."""
    dec = Decoder(tiny, _recipe(16, 8, 4))
    state = dec.start(PROMPTS4)
    x = state.x.clone()
    x[:, state.gen_start:state.gen_start + 5] = torch.arange(5, 10)     # some decoded tokens
    starts = torch.tensor([0, 8, 0, 8]) + state.gen_start
    shadow = starts[:, None] + torch.arange(8)
    with torch.inference_mode():
        res = tiny.execute(x, attention_mask=state.attention_mask, plan=ComputePlan.shadowed(shadow))
        out = torch.cat([res.logits, res.shadow_logits], dim=1)        # canvas columns, then the shadows
        plain = tiny(x, attention_mask=state.attention_mask)
    L = state.length
    assert out.shape == (4, L + 8, tiny.spec.vocab_size)
    assert torch.allclose(out[:, :L], plain, rtol=0, atol=1e-12)
    W = weights(tiny)
    for b in range(4):
        pad = int((~state.attention_mask[b]).sum())
        ref = shadow_forward(W, x[b, pad:], (shadow[b] - pad).tolist(), tiny.spec.mask_token_id)
        assert torch.allclose(out[b, pad:L], ref[:L - pad], rtol=0, atol=1e-10)
        assert torch.allclose(out[b, L:], ref[L - pad:], rtol=0, atol=1e-10)
        # and the shadow is not the canvas query at the same position
        assert not torch.allclose(out[b, L], plain[b, shadow[b, 0]], atol=1e-3)


SETTINGS = [dict(tau_in=0.7, tau_out=0.9), dict(tau_in=0.1, tau_out=0.5), dict(tau_in=0.05, tau_out=0.9),
            dict(tau_in=0.05, tau_out=0.9, cap_ratio=0.3, cap_min=2, cap_max=3)]


@pytest.mark.parametrize("policy", SETTINGS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("gen,block,batch", [(24, 12, 4), (16, 16, 4), (24, 8, 1)])
def test_matches_reference_on_tiny_llada(tiny, policy, gen, block, batch):
    prompts = PROMPTS4[:batch]
    out = Decoder(tiny, _recipe(gen, block, batch, **policy)).generate(prompts, keep_states=True)
    remasks = _remasks(out.states[0])
    W = weights(tiny)
    for j, prompt in enumerate(prompts):
        ref, nfe, n_remask = wino_generate(W, prompt, mask_id=47, gen_length=gen, block_length=block, **policy)
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe, f"row {j}"
        assert remasks[j] == n_remask, f"row {j}"


def test_narrow_out_is_live(tiny):
    """Re-masks happen, and they change the output: without narrow out (tau_out 0) the tokens
    and forwards differ, so the verify path is exercised by the parity test above."""
    on = Decoder(tiny, _recipe(24, 12, 4, tau_in=0.1, tau_out=0.5)).generate(PROMPTS4, keep_states=True)
    off = Decoder(tiny, _recipe(24, 12, 4, tau_in=0.1, tau_out=0.0)).generate(PROMPTS4, keep_states=True)
    assert sum(_remasks(on.states[0])) > 0 and sum(_remasks(off.states[0])) == 0
    assert on.tokens != off.tokens


@pytest.mark.parametrize("policy", [SETTINGS[1], SETTINGS[3]])
@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_invariants(tiny, policy, cfg):
    data = _recipe(16, 8, 4, **policy).to_dict()
    data["generation"]["cfg_scale"] = cfg
    check_invariants(tiny, data, prompts=PROMPTS4)


def test_shipped_recipe_keeps_the_invariants(tiny):
    from dllm_decode.recipes import find_recipe

    check_invariants(tiny, load_recipe(find_recipe("wino")), prompts=PROMPTS4,
                     overrides=["generation.dtype=float64", "generation.gen_length=32"])


def test_dream_is_refused():
    dream = _tiny("dream")
    x = torch.full((1, 8), 47)
    with pytest.raises(ValueError, match="LLaDA family"):
        dream(x, plan=ComputePlan(shadow=torch.arange(4, 8)[None]))
    with pytest.raises(RecipeError, match="Dream"):
        Decoder(dream, recipe_from_dict({"model": {"path": str(ROOT / "models" / "dream-reference")},
                                         "policy": "wino", "generation": {"gen_length": 16}}))


def test_recipe_checks():
    with pytest.raises(RecipeError, match="score: wino"):
        Decoder(_tiny(), recipe_from_dict({"policy": "llada", "select_tokens": "wino",
                                           "generation": {"gen_length": 16, "steps": 16}}))
    with pytest.raises(RecipeError, match="cache_policy: wino"):
        Decoder(_tiny(), recipe_from_dict({"policy": "llada", "score": "wino", "select_tokens": "wino",
                                           "generation": {"gen_length": 16, "steps": 16}}))


def test_matches_reference_on_llada_reference():
    """The shipped recipe (gen 96, blocks of 32, tau_in 0.7, tau_out 0.9) on the shipped model in
    float64, four held-out problems in one padded batch, each row against the reference alone."""
    from dllm_decode.recipes import find_recipe

    model, prompts = shipped_model_and_prompts("llada", ("copy", "repeat", "case", "repeat"), seed=15)
    recipe = load_recipe(find_recipe("wino"), overrides=["generation.dtype=float64"])
    out = Decoder(model, recipe).generate(prompts, keep_states=True)
    remasks = _remasks(out.states[0])
    W = weights(model)
    for j, prompt in enumerate(prompts):
        ref, nfe, n_remask = wino_generate(W, prompt, mask_id=model.spec.mask_token_id, gen_length=96,
                                           block_length=32, tau_in=0.7, tau_out=0.9)
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe < 96, f"row {j}"
        assert remasks[j] == n_remask, f"row {j}"
    assert sum(remasks) > 0                              # these problems do re-mask

"""EB-Sampler keeps every engine contract and matches the re-derived reference token for token
(T = 0, float64), on the kit's random-logits model and on the shipped llada-reference model.

Run from this folder after ``pip install -e .`` (or ``pip install .``): ``pytest``. The
reference model is found at ``$DLLM_DECODE_REFERENCE_MODEL`` or in the dllm-decode checkout
this example sits in; tests that need it are skipped without it.
"""

import os
from pathlib import Path

import pytest
import torch

import dllm_eb_sampler
from dllm_decode import RecipeError
from dllm_decode.testing import ParityMismatch
from reference_eb import eb_reference

HERE = Path(__file__).resolve().parents[1]
RECIPE = HERE / "eb-sampler.yaml"
PROMPTS = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


def recipe(gamma=0.1, order="entropy", gen=16, block=8, **generation):
    return {"choose_span": "llada", "policy": {"plugin": "eb_sampler", "gamma": gamma, "order": order},
            "generation": {"gen_length": gen, "block_length": block, "dtype": "float64", **generation}}


@pytest.fixture
def kit(dllm_kit):
    # the module imported above is the code under test, even if another copy is installed
    return dllm_kit.register("eb_sampler", dllm_eb_sampler)


def _reference_model_dir():
    env = os.environ.get("DLLM_DECODE_REFERENCE_MODEL")
    path = Path(env) if env else HERE.parents[1] / "models" / "llada-reference"
    return path if (path / "config.json").exists() else None


@pytest.mark.parametrize("gamma,order,block", [
    (0.05, "entropy", 16), (0.5, "entropy", 4), (100.0, "entropy", 8),
    (0.05, "confidence", 16), (0.5, "confidence", 4),
])
def test_parity_on_random_logits(kit, gamma, order, block):
    kit.check_parity(recipe(gamma, order, block=block), eb_reference(gamma, order), PROMPTS)


def test_gamma_bounds_the_tokens_per_step(kit):
    one = kit.check_parity(recipe(0.0, block=16), eb_reference(0.0), PROMPTS)
    assert all(r.nfe == 16 for r in one.rows)              # gamma 0: one token per forward
    wide = kit.check_parity(recipe(1e9, block=16), eb_reference(1e9), PROMPTS)
    assert all(r.nfe == 1 for r in wide.rows)              # unbounded: the whole span at once


def test_the_parity_check_can_fail(kit):
    """A reference with another budget must be told apart, or the parity tests prove nothing."""
    with pytest.raises(ParityMismatch, match="reference"):
        kit.check_parity(recipe(0.0), eb_reference(1.0), PROMPTS)


@pytest.mark.parametrize("gamma,block", [(0.0, 16), (0.1, 4), (2.0, 8)])
def test_invariants(kit, gamma, block):
    kit.check_invariants(recipe(gamma, block=block, eos={"stop": True, "deprioritize": True}))
    kit.check_invariants(recipe(gamma, block=block, temperature=0.7, seed=3))   # sampled rows too


def test_shipped_recipe_keeps_the_invariants(kit):
    kit.check_invariants(RECIPE, overrides=["generation.gen_length=16", "generation.block_length=8"])


def test_select_without_its_score_is_refused_at_load_time(kit):
    bad = {"policy": "llada", "select_tokens": "eb_sampler", "generation": {"gen_length": 8}}
    with pytest.raises(RecipeError, match="score: eb_sampler"):
        kit.check_invariants(bad)


def test_running_max_is_per_row():
    """Row 1's large entropy must not lift row 0's budget (a batch-axis cummax would)."""
    conf = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
    h = torch.tensor([[0.01, 0.02, 0.03], [5.0, 0.01, 0.01]], dtype=torch.float64)
    counts = dllm_eb_sampler.eb_counts(conf, h, gamma=0.025)
    assert counts.tolist() == [2, 3]


def test_parity_on_llada_reference(kit):
    path = _reference_model_dir()
    if path is None:
        pytest.skip("models/llada-reference not found (set DLLM_DECODE_REFERENCE_MODEL)")
    from dllm_decode import get_task, load_model

    model, tok = load_model(path, dtype="float64")
    prompts = [tok.encode(get_task(name).problems("test", 1, 3)[0].prompt, add_special_tokens=False)
               for name in ("copy", "case")]
    # a short canvas in two blocks keeps this cheap on a CPU; fewer forwards than the 32 tokens
    # means some forwards committed several, so the prefix rule is exercised, not just the fallback
    result = kit.check_parity(recipe(0.1, gen=32, block=16), eb_reference(0.1), prompts, model=model)
    assert all(r.nfe < 32 for r in result.rows), [r.nfe for r in result.rows]


def test_inside_the_blocks_of_a_block_causal_model(kit):
    """Block diffusion (SDAR-style, decoded block by block with the exact block cache): EB-Sampler
    runs inside each block and every invariant holds, batch invariance included."""
    from dllm_decode.models import build_random_model

    sdar = build_random_model("sdar", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              mask_token_id=47, eos_token_id=1, pad_token_id=0, seed=1, dtype=torch.float64,
                              block_size=4).eval()
    for gamma in (0.0, 0.5, 1e9):
        kit.check_invariants({**recipe(gamma, block=4), "cache_policy": "block_kv"}, PROMPTS, model=sdar)

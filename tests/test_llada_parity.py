"""The baseline plugins reproduce LLaDA's generate token for token at T = 0."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.testing import RandomLogitsModel
from reference_llada import llada_generate

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]

CASES = [  # gen_length, block_length, steps, cfg
    (16, 16, 16, 0.0),
    (16, 4, 16, 0.0),
    (16, 8, 8, 0.0),
    (24, 8, 12, 0.0),
    (16, 16, 5, 0.0),       # remainder on the earliest steps
    (16, 4, 8, 1.5),
    (12, 12, 12, 0.5),
]


def _ours(model, prompts, gen, block, steps, cfg):
    recipe = recipe_from_dict({"policy": "llada", "generation": {
        "gen_length": gen, "block_length": block, "steps": steps, "cfg_scale": cfg,
        "batch_size": len(prompts)}})
    return Decoder(model, recipe).generate(prompts).tokens


@pytest.mark.parametrize("gen,block,steps,cfg", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_reference_on_stub_model(gen, block, steps, cfg, batch):
    model = RandomLogitsModel(vocab_size=40, seed=gen + block + steps, sharpness=2.0)
    prompts = PROMPTS4[:batch]
    ref = llada_generate(model, prompts, mask_id=model.spec.mask_token_id, pad_id=0, steps=steps,
                         gen_length=gen, block_length=block, cfg_scale=cfg)
    assert _ours(model, prompts, gen, block, steps, cfg) == ref.tolist()


def test_reference_check_can_fail():
    """A different step count must change the tokens, or the parity test proves nothing."""
    model = RandomLogitsModel(vocab_size=40, seed=1, sharpness=2.0)
    ref = llada_generate(model, PROMPTS4, mask_id=model.spec.mask_token_id, pad_id=0, steps=16,
                         gen_length=16, block_length=16)
    assert _ours(model, PROMPTS4, 16, 16, 2, 0.0) != ref.tolist()


@pytest.fixture(scope="module")
def tiny_llada():
    from dllm_decode.models import build_random_model

    return build_random_model("llada", vocab_size=64, d_model=32, n_layers=2, n_heads=4, mask_token_id=63,
                              eos_token_id=1, pad_token_id=0, seed=7, dtype=torch.float64).eval()


@pytest.mark.parametrize("gen,block,steps,cfg", [(16, 16, 16, 0.0), (16, 4, 8, 0.0), (16, 8, 16, 2.0)])
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_reference_on_tiny_llada(tiny_llada, gen, block, steps, cfg, batch):
    prompts = PROMPTS4[:batch]
    with torch.inference_mode():
        ref = llada_generate(tiny_llada, prompts, mask_id=63, pad_id=0, steps=steps, gen_length=gen,
                             block_length=block, cfg_scale=cfg)
    assert _ours(tiny_llada, prompts, gen, block, steps, cfg) == ref.tolist()


def test_invariants_on_tiny_llada(tiny_llada):
    from dllm_decode.testing import check_invariants

    check_invariants(tiny_llada, {"policy": "llada", "generation": {"gen_length": 16, "block_length": 8, "steps": 16}},
                     prompts=PROMPTS4)

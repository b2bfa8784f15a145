"""The prophet plugin reproduces Prophet's early commit-all over LLaDA blocks token for token at
T = 0 (float64) against tests/reference_prophet.py, row by row inside a padded batch of 4, on a
tiny random LLaDA and on the shipped llada-reference; the commit-all (``Selection.finish``)
lands outside the current block only on the finishing step, and the engine refuses it when the
plan left masks without a candidate."""


import pytest
import torch

from dllm_decode.config import load_recipe, recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import PluginError, RecipeError
from dllm_decode.models import build_random_model
from dllm_decode.testing import check_invariants
from reference_prophet import prophet_generate
from shipped import shipped_model_and_prompts

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


@pytest.fixture(scope="module")
def tiny():
    return build_random_model("llada", vocab_size=48, d_model=32, n_layers=2, n_heads=4, mask_token_id=47,
                              eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64).eval()


def _recipe(gen, block, steps, batch, thresholds=(7.5, 5.0, 2.5), **policy):
    early, mid, late = thresholds
    return recipe_from_dict({"policy": {"plugin": "prophet", "early_threshold": early, "mid_threshold": mid,
                                        "late_threshold": late, **policy},
                             "generation": {"gen_length": gen, "block_length": block, "steps": steps,
                                            "batch_size": batch, "dtype": "float64"}})


def _reference(model, prompt, gen, block, steps, thresholds, **window):
    with torch.inference_mode():
        return prophet_generate(model, prompt, mask_id=model.spec.mask_token_id, steps=steps, gen_length=gen,
                                block_length=block, thresholds=thresholds, **window)


@pytest.mark.parametrize("thresholds", [(7.5, 5.0, 2.5), (1.0, 0.6, 0.3), (0.5, 0.3, 0.1)])
@pytest.mark.parametrize("window", [{}, {"answer_start": 10, "answer_length": 3}])
@pytest.mark.parametrize("gen,block,steps", [(24, 8, 24), (16, 16, 8)])
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_reference_on_tiny_llada(tiny, thresholds, window, gen, block, steps, batch):
    prompts = PROMPTS4[:batch]
    out = Decoder(tiny, _recipe(gen, block, steps, batch, thresholds, **window)).generate(prompts)
    for j, prompt in enumerate(prompts):
        ref, nfe, _ = _reference(tiny, prompt, gen, block, steps, thresholds, **window)
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe, f"row {j}"


def test_early_exit_happens_and_can_be_told_apart(tiny):
    """Low thresholds finish every row early, the paper's never do on a random model; the two
    decodes differ, so the parity test above covers both paths."""
    fast = Decoder(tiny, _recipe(24, 8, 24, 4, (0.5, 0.3, 0.1))).generate(PROMPTS4)
    full = Decoder(tiny, _recipe(24, 8, 24, 4)).generate(PROMPTS4)
    assert all(r.nfe < 24 for r in fast.rows) and all(r.nfe == 24 for r in full.rows)
    assert fast.tokens != full.tokens


def test_phase_thresholds_and_the_step_count(tiny):
    """Unreachable early and mid thresholds and a late one of 0: every row finishes at the first
    step whose progress (this step included) reaches 0.67 -- step 17 of 24 (16/24 < 0.67)."""
    out = Decoder(tiny, _recipe(24, 8, 24, 4, (1e9, 1e9, 0.0)), ).generate(PROMPTS4, keep_states=True)
    assert [r.nfe for r in out.rows] == [17] * 4
    state = out.states[0]
    last = state.history[-1]
    # the finishing step commits in every block, and its recorded span is the whole generation
    gen = torch.arange(state.length) >= state.gen_start
    assert bool((last.span == torch.tensor([state.gen_start, state.length])).all())
    assert bool(last.committed[:, state.gen_start + 16:].all())              # the third block, untouched before
    assert bool((last.committed | (state.commit_step < 16)).masked_select(gen).all())
    for row in out.rows:
        assert row.commit_step.count(16) > 1


def test_answer_gap_reads_the_window_through_query_positions(tiny):
    """A plan that returns part of the canvas gives the same gap as a full forward when it covers
    the window, and NaN (never a trigger) when it does not."""
    from dllm_decode.policies.prophet import Options, answer_gap

    dec = Decoder(tiny, _recipe(16, 8, 16, 4))
    state = dec.start(PROMPTS4)
    logits = tiny(state.x, attention_mask=state.attention_mask)
    opts = Options(answer_start=2, answer_length=4)
    full = answer_gap(state, logits, None, opts)
    cols = torch.arange(state.gen_start, state.length).expand(4, -1)
    part = answer_gap(state, logits[:, state.gen_start:], cols, opts)
    assert torch.equal(full, part)
    tail = torch.arange(state.gen_start + 8, state.length).expand(4, -1)
    assert torch.isnan(answer_gap(state, logits[:, state.gen_start + 8:], tail, opts)).all()


def test_finish_needs_a_candidate_at_every_mask(tiny):
    """Under the dual KV cache only the block is queried: finishing would commit masks that have
    no candidate, and the engine refuses the step instead."""
    data = _recipe(24, 8, 24, 1, (1e9, 0.0, 0.0)).to_dict()    # finishes at step 8 of block 0
    data["cache_policy"] = {"plugin": "kv_block", "mode": "dual"}
    with pytest.raises(PluginError, match="no candidate"):
        Decoder(tiny, recipe_from_dict(data)).generate(PROMPTS4[:1])


def test_recipe_checks():
    with pytest.raises(RecipeError, match="score: prophet"):
        recipe = recipe_from_dict({"policy": "llada", "select_tokens": "prophet",
                                   "generation": {"gen_length": 16, "steps": 16}})
        Decoder(build_random_model("llada", vocab_size=16, mask_token_id=15), recipe)
    with pytest.raises(RecipeError, match="answer_start"):
        Decoder(build_random_model("llada", vocab_size=16, mask_token_id=15),
                recipe_from_dict({"policy": {"plugin": "prophet", "answer_start": 16},
                                  "generation": {"gen_length": 16, "steps": 16}}))


@pytest.mark.parametrize("thresholds", [(0.5, 0.3, 0.1), (1e9, 1e9, 0.0)])
def test_invariants(tiny, thresholds):
    check_invariants(tiny, _recipe(24, 8, 24, 4, thresholds), prompts=PROMPTS4)


def test_shipped_recipe_keeps_the_invariants(tiny):
    from dllm_decode.recipes import find_recipe

    check_invariants(tiny, load_recipe(find_recipe("prophet")), prompts=PROMPTS4,
                     overrides=["generation.dtype=float64", "generation.gen_length=32", "generation.steps=32"])


def test_matches_reference_on_llada_reference():
    """The shipped recipe (gen 96, blocks of 32, the paper's thresholds) on the shipped model in
    float64, four held-out problems in one padded batch, each row against the reference alone."""
    from dllm_decode.recipes import find_recipe

    model, prompts = shipped_model_and_prompts("llada", ("copy", "repeat", "case", "repeat"), seed=1)
    recipe = load_recipe(find_recipe("prophet"), overrides=["generation.dtype=float64"])
    out = Decoder(model, recipe).generate(prompts)
    p = recipe.policy.params
    exits = []
    for j, prompt in enumerate(prompts):
        ref, nfe, exit_step = _reference(model, prompt, 96, 32, 96, (7.5, 5.0, 2.5),
                                         answer_start=p["answer_start"], answer_length=p["answer_length"])
        assert out.tokens[j] == ref, f"row {j}"
        assert out.rows[j].nfe == nfe, f"row {j}"
        exits.append(exit_step)
    assert any(e is not None for e in exits)            # the shipped recipe does exit early here

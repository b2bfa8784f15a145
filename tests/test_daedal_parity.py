"""The daedal plugins reproduce DAEDAL's LLaDA loop token for token and forward for forward at
T = 0 (float64 models) against tests/reference_daedal.py, on a stub model, a tiny random LLaDA and
the shipped llada-reference, alone and in a padded batch where rows grow to different lengths;
both stages fire (growth at the end, EOS padding, mask insertion, the maximum length, the model's
limit); a wrong setting in the reference is caught; the recipe checks refuse what cannot work; the
plugins keep every engine invariant."""

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import RecipeError
from dllm_decode.models import build_random_model
from dllm_decode.testing import ParityMismatch, RandomLogitsModel, ReferenceOutput, check_invariants, check_parity
from reference_daedal import daedal_generate
from shipped import shipped_model_and_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]
STUB = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0)
# the same stub with a short position limit: each row's maximum is capped by its own prompt
SHORT = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0, max_length=30)


def _recipe(gen, block, **options):
    return {"policy": {"plugin": "daedal", **options}, "cache_policy": "none",
            "generation": {"gen_length": gen, "block_length": block, "dtype": "float64"}}


def _ref(**options):
    def ref(model, prompt, recipe):
        g = recipe.generation
        tokens, nfe = daedal_generate(lambda x: model(x), prompt, mask_id=model.spec.mask_token_id,
                                      eos_id=options.get("eos_id", model.spec.eos_token_id),
                                      initial_gen_length=g.gen_length, block_length=g.block,
                                      max_length=model.spec.max_length,
                                      **{k: v for k, v in options.items() if k != "eos_id"})
        return ReferenceOutput(tokens, nfe)
    return ref


# The untrained models never predict their EOS id, so most settings name as EOS a token they do
# predict (eos_id), with thresholds where their confidences lie (the stub's 0.6-0.98, the tiny
# LLaDA's 0.09-0.11): rows stop growing at different lengths, get EOS padding, and insert masks.
STUB_SETTINGS = [
    dict(max_gen_length=40, eos_id=5, eos_check_tokens=4, eos_confidence_threshold=0.2,
         expand_eos_confidence_threshold=0.1, high_conf_threshold=0.9, low_conf_threshold=0.8),
    dict(max_gen_length=40, eos_id=5, eos_check_tokens=4, eos_confidence_threshold=0.2,
         expand_eos_confidence_threshold=0.1, high_conf_threshold=0.7, low_conf_threshold=0.65),
    dict(max_gen_length=40, eos_id=5, eos_check_tokens=2, eos_confidence_threshold=0.0,
         expand_eos_confidence_threshold=1.0, high_conf_threshold=0.9, low_conf_threshold=1.0),
    dict(max_gen_length=24),                                 # the real EOS: grow to the maximum, no insertion
]
TINY_SETTINGS = [
    dict(max_gen_length=40, eos_id=29, eos_check_tokens=2, eos_confidence_threshold=0.1,
         expand_eos_confidence_threshold=0.5, high_conf_threshold=0.105, low_conf_threshold=0.1),
    dict(max_gen_length=36, eos_id=29, eos_check_tokens=2, eos_confidence_threshold=0.1,
         expand_eos_confidence_threshold=0.5, high_conf_threshold=0.1, low_conf_threshold=0.1),
    dict(max_gen_length=40, eos_id=29, eos_check_tokens=3, eos_confidence_threshold=0.05,
         expand_eos_confidence_threshold=0.5, high_conf_threshold=0.105, low_conf_threshold=0.102,
         expansion_factor=3),
    dict(max_gen_length=30, eos_id=16, eos_check_tokens=4, eos_confidence_threshold=0.2,
         expand_eos_confidence_threshold=1.0, high_conf_threshold=0.11, low_conf_threshold=0.104,
         expansion_factor=1),
]
CASES = ([("stub", o) for o in STUB_SETTINGS] + [("short", STUB_SETTINGS[2])]
         + [("tiny-llada", o) for o in TINY_SETTINGS])


def _id(case):
    which, opts = case
    return which + "-" + "-".join(f"{k[:8]}{v}" for k, v in opts.items())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, tiny_llada):
    which, opts = case
    model = {"stub": STUB, "short": SHORT, "tiny-llada": tiny_llada}[which]
    for batched in (False, True):
        check_parity(model, _recipe(8, 4, **opts), _ref(**opts), PROMPTS4, batched=batched)


def _stages(model, recipe):
    """Per row: (stage-1 growths, EOS padding, insertions, shortened insertions, length)."""
    out = Decoder(model, recipe_from_dict({**recipe, "generation": {**recipe["generation"], "batch_size": 4}})
                  ).generate(PROMPTS4, keep_states=True)
    rows = []
    for b, row in enumerate(out.rows):
        resizes = [r.resize for r in out.states[0].history if r.resize is not None and r.active[b]]
        mask = model.spec.mask_token_id
        grow = sum(int(r.append[b]) > 0 and int(r.fill[b]) == mask for r in resizes)
        pad = sum(int(r.append[b]) for r in resizes if int(r.fill[b]) != mask)
        n_ins = [int(r.insert[b].sum()) for r in resizes if int(r.insert[b].sum())]
        factor = recipe["policy"].get("expansion_factor", 8)
        rows.append((grow, pad, len(n_ins), sum(n < factor - 1 for n in n_ins), len(row.tokens)))
    return rows


def test_both_stages_fire_and_rows_grow_apart(tiny_llada):
    """In one padded batch: rows that grow at the end and rows that do not, EOS padding, mask
    insertions (one shortened at the maximum), and different final lengths; a reference with
    another expansion factor disagrees."""
    recipe = _recipe(8, 4, **TINY_SETTINGS[1])
    rows = _stages(tiny_llada, recipe)
    assert {r[0] > 0 for r in rows} == {True, False}
    assert any(r[1] > 0 for r in rows) and any(r[2] > 0 for r in rows) and any(r[3] > 0 for r in rows)
    assert len({r[4] for r in rows}) > 1 and max(r[4] for r in rows) == 36
    with pytest.raises(ParityMismatch):
        check_parity(tiny_llada, recipe, _ref(**dict(TINY_SETTINGS[1], expansion_factor=4)), PROMPTS4)


def test_the_model_limit_caps_each_row_by_its_own_prompt():
    """max_length 30: a row of prompt length p grows to at most 30 - p positions."""
    rows = _stages(SHORT, _recipe(8, 4, **STUB_SETTINGS[2]))
    assert [r[4] for r in rows] == [30 - len(p) for p in PROMPTS4]


def test_matches_reference_on_llada_reference():
    """The shipped llada-reference, float64, held-out prompts of four tasks, the code's defaults
    (initial 64, blocks of 32): rows grow at the end until the model's EOS confidence says the
    answer fits; alone and as a padded batch."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "case", "add", "listops"))
    result = check_parity(model, _recipe(64, 32), _ref(), prompts)
    assert max(len(r.tokens) for r in result.rows) > 64 + 16


def test_matches_reference_on_llada_reference_with_insertions():
    """The shipped llada-reference with thresholds at which stage 2 inserts masks and rows reach
    the maximum length (initial 32, blocks of 16, at most 160)."""
    model, prompts = shipped_model_and_prompts("llada", ("case", "add", "listops"))
    opts = dict(max_gen_length=160, low_conf_threshold=0.99, high_conf_threshold=0.9999,
                expand_eos_confidence_threshold=1.0)
    result = check_parity(model, _recipe(32, 16, **opts), _ref(**opts), prompts)
    assert 160 in [len(r.tokens) for r in result.rows]


@pytest.mark.parametrize("change,match", [
    ({"cache_policy": {"plugin": "kv_block"}}, "full one"),
    ({"generation": {"gen_length": 64, "eos": {"ban": True}}}, "eos.ban"),
    ({"generation": {"gen_length": 64, "eos": {"deprioritize": True}}}, "eos.deprioritize"),
    ({"generation": {"gen_length": 4096}}, "max_gen_length"),
    ({"select_tokens": "threshold"}, "needs its own select_tokens"),
])
def test_the_recipe_checks_refuse_what_cannot_work(change, match):
    recipe = {**_recipe(64, 32), **change}
    with pytest.raises(RecipeError, match=match):
        Decoder(STUB, recipe_from_dict(recipe))


@pytest.mark.parametrize("temperature,cfg", [(0.0, 0.0), (0.7, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("family", ["stub", "llada", "dream"])
def test_invariants(temperature, cfg, family, tiny_llada):
    model = {"stub": RandomLogitsModel(vocab_size=40, seed=2), "llada": tiny_llada,
             "dream": build_random_model("dream", vocab_size=32, d_model=32, n_layers=2, n_heads=4, mask_token_id=31,
                                         eos_token_id=1, pad_token_id=0, seed=4, dtype=torch.float64).eval()}[family]
    opts = dict(max_gen_length=24, eos_id=5, eos_check_tokens=2, eos_confidence_threshold=0.05,
                expand_eos_confidence_threshold=1.0, high_conf_threshold=0.5, low_conf_threshold=0.6)
    recipe = _recipe(8, 4, **opts)
    recipe["generation"].update(temperature=temperature, cfg_scale=cfg)
    check_invariants(model, recipe)

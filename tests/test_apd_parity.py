"""The apd plugin reproduces APD token for token at T = 0 (float64) against tests/reference_apd.py:
on tiny random LLaDA / Dream models with a tiny random Llama verifier, and on the shipped
llada-reference with ar-reference as verifier; alone and in a padded batch. The verifier's KV
cache and the per-row lookahead plan must give what recomputing and cutting the canvas give."""

from pathlib import Path

import pytest
import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import RecipeError
from dllm_decode.models import ComputePlan, build_random_model
from dllm_decode.testing import check_invariants
from reference_apd import apd_generate
from shipped import shipped_model_and_prompts

ROOT = Path(__file__).resolve().parents[1]
PROMPTS4 = [[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18], [20]]


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(torch.float64)
    with torch.no_grad():                       # sharper than the default init: longer agreements
        model.lm_head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("verifier")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models():
    return {fam: build_random_model(fam, vocab_size=32, d_model=32, n_layers=2, n_heads=4, mask_token_id=31,
                                    eos_token_id=1, pad_token_id=0, seed=6, dtype=torch.float64).eval()
            for fam in ("llada", "dream")}


def _recipe(verifier, gen, batch, **params):
    return recipe_from_dict({"policy": {"plugin": "apd", "verifier": str(verifier), **params},
                             "generation": {"gen_length": gen, "batch_size": batch, "dtype": "float64",
                                            "eos": {"stop": True}}})


def _check(model, verifier_path, gen, batch, prompts=PROMPTS4, **params):
    from transformers import AutoModelForCausalLM

    verifier = AutoModelForCausalLM.from_pretrained(verifier_path, dtype=torch.float64).eval()
    out = Decoder(model, _recipe(verifier_path, gen, batch, **params)).generate(prompts[:batch], keep_states=True)
    eos = {model.spec.eos_token_id}
    steps = []
    for j in range(batch):
        ref, nfe, acc = apd_generate(model, verifier, prompts[j], mask_id=model.spec.mask_token_id,
                                     eos_ids=eos, gen_length=gen, R=params.get("mixture_weight", 0.7),
                                     M=params.get("max_lookahead"), W=params.get("kv_window"))
        got = out.tokens[j][:len(ref)]
        assert got == ref, f"row {j}"
        if batch == 1:
            assert out.rows[j].nfe == nfe
        steps.append(acc)
    return out, steps


@pytest.mark.parametrize("params", [dict(mixture_weight=0.7), dict(mixture_weight=0.95),
                                    dict(mixture_weight=0.3, max_lookahead=4), dict(mixture_weight=0.9, max_lookahead=3),
                                    dict(mixture_weight=0.9, kv_window=2), dict(mixture_weight=0.95, kv_window=1,
                                                                                max_lookahead=5)],
                         ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("batch", [1, 4])
def test_matches_reference_on_tiny_models(models, verifier_dir, params, family, batch):
    _check(models[family], verifier_dir, 16, batch, **params)


def test_reference_models_accept_several_tokens_per_step():
    """llada-reference drafting, ar-reference verifying (float64): parity, and the point of APD:
    long agreeing prefixes, so far fewer dLLM forwards than tokens."""
    model, prompts = shipped_model_and_prompts("llada", ("copy", "repeat"))
    out, steps = _check(model, ROOT / "models" / "ar-reference", 96, 2, prompts=prompts, mixture_weight=0.7)
    for j, acc in enumerate(steps):
        assert max(acc) >= 4 and len(acc) < sum(acc) / 2, acc
    assert out.states[0].counters["verifier_forwards"] >= 1


def test_lookahead_plan_equals_cutting_the_canvas(models):
    """ComputePlan.lookahead(k) gives, for positions before k, the logits of the canvas cut at k
    (per row), for both families."""
    for model in models.values():
        x = torch.randint(2, 31, (3, 12))
        x[:, 6:] = 31
        limit = torch.tensor([7, 9, 12])
        got = model(x, plan=ComputePlan.lookahead(limit))
        for b in range(3):
            want = model(x[b:b + 1, :int(limit[b])])
            torch.testing.assert_close(got[b, :int(limit[b])], want[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("extra", [dict(max_lookahead=5), dict(kv_window=1, max_lookahead=4)])
def test_invariants(models, verifier_dir, extra):
    check_invariants(models["llada"], {"policy": {"plugin": "apd", "verifier": str(verifier_dir), **extra},
                                       "generation": {"gen_length": 12, "dtype": "float64"}},
                     prompts=[[5, 9, 11, 3], [7, 2], [13, 14, 15, 16, 17, 18]])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_window_over_the_whole_canvas_is_exact(models, verifier_dir, family):
    """kv_window larger than the canvas recomputes everything each forward: the no-cache tokens."""
    full = Decoder(models[family], _recipe(verifier_dir, 16, 4, mixture_weight=0.9)).generate(PROMPTS4)
    windowed = Decoder(models[family], _recipe(verifier_dir, 16, 4, mixture_weight=0.9, kv_window=64)).generate(PROMPTS4)
    assert windowed.tokens == full.tokens


def test_bad_verifier_and_missing_plan_are_refused(models, verifier_dir, tmp_path):
    import json
    import shutil

    with pytest.raises(RecipeError, match="verifier.*not a model directory"):
        Decoder(models["llada"], _recipe(tmp_path / "nothing", 16, 1))
    with pytest.raises(RecipeError, match="max_lookahead needs `cache_policy: apd`"):
        Decoder(models["llada"], recipe_from_dict({"policy": {"plugin": "apd", "verifier": str(verifier_dir),
                                                              "max_lookahead": 4}, "cache_policy": "none"}))
    # a verifier whose tokenizer numbers two characters the other way round
    other = tmp_path / "other-ar"
    other.mkdir()
    shutil.copy(ROOT / "models" / "ar-reference" / "config.json", other)
    tok = json.loads((ROOT / "models" / "ar-reference" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    recipe = recipe_from_dict({"model": {"path": str(ROOT / "models" / "llada-reference")},
                               "policy": {"plugin": "apd", "verifier": str(other)}})
    with pytest.raises(RecipeError, match="tokenizer of .* differs from the model's"):
        Decoder(models["llada"], recipe)


def test_the_verifier_cache_goes_by_the_name_transformers_declares(models, verifier_dir):
    """transformers 5.25 renamed the forward's ``past_key_values`` to ``cache``: the old name still
    works there but warns (and goes in 5.40). The verifier is called by the name its forward
    declares, so an APD decode logs no such warning on either side of the rename."""
    import inspect
    import logging

    from transformers.utils import logging as hf_logging

    from dllm_decode.models.loader import load_causal_lm
    from dllm_decode.policies.apd import cache_keyword

    verifier = load_causal_lm(str(verifier_dir))
    assert cache_keyword(verifier) in inspect.signature(verifier.forward).parameters
    logger = hf_logging.get_logger("transformers")
    logger.warning_once.cache_clear()           # a warning already given this session would hide one

    class Catch(logging.Handler):
        seen: list[str] = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    handler = Catch()
    logger.addHandler(handler)
    try:
        out = Decoder(models["llada"], _recipe(verifier_dir, 16, 4, mixture_weight=0.9)).generate(PROMPTS4, keep_states=True)
    finally:
        logger.removeHandler(handler)
    assert out.states[0].counters["verifier_forwards"] >= 1
    assert not [m for m in handler.seen if "deprecated" in m], handler.seen

"""The block-diffusion families (SDAR, Fast-dLLM v2, LLaDA2) on tiny random models.

Parity in float64, the same weights under their own parameter names and the checkpoints'
block-causal mask given explicitly: SDAR against transformers' Qwen3ForCausalLM, Fast-dLLM v2
against Qwen2ForCausalLM (both the layouts the checkpoints were adapted from, JetAstra/SDAR
``modeling_sdar.py`` and NVlabs/Fast-dLLM v2 ``modeling.py``), LLaDA2 against the plain float64
re-derivation of inclusionAI's ``modeling_llada2_moe.py`` in tests/reference_forward.py (router
included). transformers runs RMSNorm and RoPE angles in float32 even in a float64 model; the
reference here runs those two in float64 (same maths), so the comparison is at float64 round-off.

The block step: a block fed against the K/V of the finished blocks in the store gives the same
bits as a forward over the whole canvas, in float64 and float32."""
import pytest
import torch

from dllm_decode.models import CacheStore, ComputePlan, build_random_model
from reference_forward import block_causal_mask, glm4_moe_reference, hf_logits, hf_reference, llada2_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["sdar", "fast_dllm_v2", "llada2"]
V, D, LAYERS, HEADS, KV, MLP, BLOCK = 64, 32, 2, 4, 2, 80, 4
BLOCK_KEY = {"sdar": "block_size", "fast_dllm_v2": "bd_size", "llada2": "block_size"}


def make(family, dtype=torch.float64, seed=0, **kw):
    args = dict(vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV, mlp_hidden=MLP,
                mask_token_id=V - 1, eos_token_id=V - 2, seed=seed, dtype=dtype, **{BLOCK_KEY[family]: BLOCK})
    return build_random_model(family, **{**args, **kw})


def canvas(pads=(0,), L=16, prompt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (len(pads), L), generator=g)
    ids[:, prompt:] = V - 1
    mask = torch.ones(len(pads), L, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :n] = False
        ids[b, :n] = V - 2
    return ids, mask


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def raw(model, ids, mask=None, plan=None, store=None):
    plan = ComputePlan.full() if plan is None else plan
    with torch.no_grad():
        return model(ids, mask, plan=plan.with_(shift=False), store=store)


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
@pytest.mark.parametrize("pads", [(0,), (0, 3, 5)], ids=["batch1", "padded3"])
def test_qwen_layouts_match_transformers(family, pads):
    model = make(family)
    ids, mask = canvas(pads, seed=1)
    want = hf_logits(hf_reference(model), ids, mask, BLOCK)
    got = raw(model, ids, mask)
    assert rel_err(got[mask], want[mask]) < 1e-13
    # the float32 casts transformers makes are all that the float64 patch changes
    plain = hf_logits(hf_reference(model, float64_casts=False), ids, mask, BLOCK)
    assert 1e-13 < rel_err(got[mask], plain[mask]) < 1e-5
    if family == "fast_dllm_v2":
        # token shift: aligned logit p is the raw logit of p - 1 (the first position keeps its own)
        with torch.no_grad():
            aligned = model(ids[:1], mask[:1])
        assert torch.equal(aligned[0, 1:], got[0, :-1]) and torch.equal(aligned[0, 0], got[0, 0])


@pytest.mark.parametrize("pads", [(0,), (0, 3, 5)], ids=["batch1", "padded3"])
def test_llada2_matches_reference(pads):
    model = make("llada2")
    c = model.config.to_dict()
    ids, mask = canvas(pads, seed=2)
    got = raw(model, ids, mask)
    sd = model.state_dict()
    for b in range(len(pads)):
        want = llada2_forward(sd, c, ids[b], mask[b], BLOCK)
        assert rel_err(got[b][mask[b]], want[mask[b]]) < 1e-13


def test_llada2_reference_matches_transformers_glm4_moe():
    """The plain LLaDA2 reference is itself checked against a third-party implementation of the
    same blocks and router, transformers' GLM-4.5 MoE (its gate runs in float32, hence the
    tolerance; a wrong router rule gives O(1) differences)."""
    model = make("llada2", n_layers=3)
    c = model.config.to_dict()
    sd = model.state_dict()
    ids, mask = canvas((0, 3), seed=12)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        glm = glm4_moe_reference(sd, c)(input_ids=ids, attention_mask=block_causal_mask(mask, BLOCK),
                                        position_ids=pos).logits
    for b in range(2):
        want = llada2_forward(sd, c, ids[b], mask[b], BLOCK)
        assert rel_err(want[mask[b]], glm[b][mask[b]]) < 1e-5


def test_llada2_router_is_exercised():
    """The tiny config routes tokens to different experts, the dense first layer and the shared
    expert matter, and a shifted expert_bias (used for choosing only) changes the choice: the
    parity above would see a wrong router."""
    model = make("llada2")
    moe = model.model.layers[1].mlp
    h = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    idx, w = moe.gate(h)
    assert len(set(idx.flatten().tolist())) >= 6 and torch.allclose(w.sum(-1), torch.full((40,), 2.5).double())
    ids, mask = canvas((0,), seed=3)
    before = raw(model, ids, mask)
    with torch.no_grad():
        moe.gate.expert_bias.add_(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64))
        new_idx, new_w = moe.gate(h)
    assert (new_idx.sort(-1).values != idx.sort(-1).values).any()
    chosen_same = (new_idx == idx).all(-1)
    assert torch.equal(new_w[chosen_same], w[chosen_same])   # the bias only chooses; weights are unbiased
    after = raw(model, ids, mask)
    want = llada2_forward(model.state_dict(), model.config.to_dict(), ids[0], mask[0], BLOCK)
    assert rel_err(after[0], want) < 1e-13 and rel_err(after, before) > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_block_causal(family):
    """Inside a block every position sees every other; a block never sees later ones."""
    model = make(family)
    ids, mask = canvas((0,), seed=4)
    base = raw(model, ids, mask)
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1) % (V - 2)            # block 2
    out = raw(model, ids=later, mask=mask)
    assert torch.equal(out[0, :8], base[0, :8]) and not torch.allclose(out[0, 8], base[0, 8])
    with pytest.raises(ValueError, match="block-causal"):
        raw(model, ids, mask, ComputePlan.shadowed(torch.tensor([[7]])))


# ------------------------------------------------------------------ the block step
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_step_equals_full_forward_bit_for_bit(family, dtype):
    model = make(family, dtype=dtype)
    ids, mask = canvas((0, 0), L=20, prompt=6, seed=6)
    store = CacheStore()
    raw(model, ids, None, ComputePlan.refresh(end=4), store)             # prefill: the prompt's whole block
    g = torch.Generator().manual_seed(7)
    for s in range(4, 20, BLOCK):
        e = s + BLOCK
        ids[:, e:] = torch.randint(0, V - 2, (2, 20 - e), generator=g)  # whatever follows is never seen
        for commit in (False, True):     # a denoising step, then the step that leaves the final K/V
            if commit:
                ids[:, s:e] = torch.randint(0, V - 2, (2, BLOCK), generator=g)
            step = raw(model, ids, None, ComputePlan.block_step(s, e), store)
            assert torch.equal(step, raw(model, ids)[:, s:e]), (s, e, commit)
    # not vacuous: a store holding another canvas's finished blocks gives other logits
    stale = CacheStore()
    other = ids.clone()
    other[:, 1] = (other[:, 1] + 1) % (V - 2)
    raw(model, other, None, ComputePlan.refresh(end=8), stale)
    assert not torch.allclose(raw(model, ids, None, ComputePlan.block_step(8, 12), stale), raw(model, ids)[:, 8:12])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_row_equals_row_alone(family):
    model = make(family)
    pads = (0, 3, 6)
    ids, mask = canvas(pads, L=18, seed=8)
    batch = raw(model, ids, mask)
    for b, n in enumerate(pads):
        torch.testing.assert_close(batch[b, n:], raw(model, ids[b:b + 1, n:])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_flop_count_matches_torch_counter(family):
    """The executor's count (MoE: router plus the k chosen and the shared experts per token)
    equals torch's FlopCounterMode plus the attention matmuls, which it does not count for the
    CPU SDPA kernel: block-causal queries attend over every canvas position."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make(family)
    ids, _ = canvas((0, 0), L=16, seed=9)
    a = model.arch
    hd = a.n_heads * a.head_dim
    store = CacheStore()
    for plan, queries in ((ComputePlan.refresh(end=8), 8), (ComputePlan.block_step(8, 12), 4), (None, 16)):
        before = store.flops
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids, plan=plan, store=store if plan is not None else None)
        if plan is None:
            continue
        attention = 4 * 2 * hd * queries * 16 * a.n_layers
        assert store.flops - before == counter.get_total_flops() + attention, plan.name


def test_block_size_is_the_plans_or_the_models():
    model = make("sdar")
    ids, mask = canvas((0,), seed=10)
    wide = raw(model, ids, mask, ComputePlan.full().with_(block_size=8))
    bigger = make("sdar", block_size=8)
    assert torch.equal(wide, raw(bigger, ids, mask))
    assert not torch.allclose(wide, raw(model, ids, mask))
    with pytest.raises(ValueError, match="bidirectionally"):
        llada = build_random_model("llada", vocab_size=V, d_model=D, n_layers=1, n_heads=HEADS)
        llada(ids, plan=ComputePlan.full().with_(block_size=4))
    with pytest.raises(ValueError, match="block_size"):
        ComputePlan.block_step(0, 4, block_size=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_blocks_of_a_padded_batch(family):
    """Left padding shifts a row's blocks (they start at its first real token): a prefill cut per
    row at its own block boundary and an index feed of each row's own block give what the
    whole-canvas forward gives there."""
    model = make(family)
    ids, mask = canvas((0, 2), L=16, seed=11)
    full = raw(model, ids, mask)
    store = CacheStore()
    raw(model, ids, mask, ComputePlan.refresh(key_limit=torch.tensor([4, 6])), store)
    index = torch.tensor([[4, 5, 6, 7], [6, 7, 8, 9]])
    got = raw(model, ids, mask, ComputePlan.subset(index), store)
    want = full.gather(1, index[..., None].expand(-1, -1, V))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

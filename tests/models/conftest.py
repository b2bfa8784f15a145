"""Shared helpers for the model tests, exposed through the `lib` fixture.

Two references live here, both independent of dllm_decode's executor:
- `eurobert(model)`: transformers' EuroBertForMaskedLM loaded with the model's weights (LLaDA
  names renamed to EuroBERT's (the mapping below), Dream names as they are, zero o_proj bias).
- `naive(...)`: a per-row, explicit re-implementation of one forward with stale-feature
  reuse (K/V bank, attention / FFN outputs, V-verify), written from the cached forwards of Fast-dLLM, dLLM-Cache and WINO.
  Its plain mode is itself checked against EuroBERT (test_models_parity.py).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

V, D_MODEL, N_LAYERS, N_HEADS, MLP = 64, 32, 2, 4, 80
MASK_ID, PAD_ID = V - 1, V - 2


def make_model(family: str, dtype=torch.float64, seed: int = 0, **kw):
    from dllm_decode.models import build_random_model
    args = dict(vocab_size=V, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS,
                n_kv_heads=4 if family == "llada" else 2, mlp_hidden=MLP,
                mask_token_id=MASK_ID, eos_token_id=PAD_ID, seed=seed, dtype=dtype)
    args.update(kw)
    return build_random_model(family, **args)


def canvas(pads=(0, 2, 4), P=6, G=8, seed=0):
    """Left-padded prompts of length P (row b has pads[b] pads) followed by G masks.
    -> ids (B, P+G) long, mask (B, P+G) bool."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(pads), P + G
    ids = torch.randint(0, V - 2, (B, L), generator=g)
    ids[:, P:] = MASK_ID
    mask = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :n] = False
        ids[b, :n] = PAD_ID
    return ids, mask


def commit(ids, positions, seed):
    """Copy of ids with random non-special tokens written at `positions` (list per row or one
    list for all rows)."""
    g = torch.Generator().manual_seed(seed)
    out = ids.clone()
    B = ids.shape[0]
    for b in range(B):
        pos = positions[b] if isinstance(positions[0], (list, tuple)) else positions
        for p in pos:
            out[b, p] = int(torch.randint(0, V - 2, (1,), generator=g))
    return out


# ---------------------------------------------------------------------- EuroBERT reference
_LLADA_TO_EUROBERT = [  # GSAI-ML/LLaDA-8B-Base modeling_llada.py names -> EuroBERT's
    (".attn_norm.", ".input_layernorm."), (".q_proj.", ".self_attn.q_proj."),
    (".k_proj.", ".self_attn.k_proj."), (".v_proj.", ".self_attn.v_proj."),
    (".attn_out.", ".self_attn.o_proj."), (".ff_norm.", ".post_attention_layernorm."),
    (".ff_proj.", ".mlp.gate_proj."), (".up_proj.", ".mlp.up_proj."), (".ff_out.", ".mlp.down_proj."),
]


def llada_to_eurobert(name: str) -> str:
    top = {"model.transformer.wte.weight": "model.embed_tokens.weight",
           "model.transformer.ln_f.weight": "model.norm.weight",
           "model.transformer.ff_out.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    name = name.replace("model.transformer.blocks.", "model.layers.")
    for a, b in _LLADA_TO_EUROBERT:
        if a in name:
            return name.replace(a, b)
    raise KeyError(name)


def eurobert_from_state(family: str, sd: dict, *, vocab, d, layers, heads, kv_heads, mlp,
                        eps, theta, dtype=torch.float64):
    from transformers import EuroBertConfig, EuroBertForMaskedLM
    cfg = EuroBertConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu",
        rms_norm_eps=eps, rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=False, attention_bias=(family == "dream"), mlp_bias=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, mask_token_id=0,
        max_position_embeddings=4096)
    # sdpa computes softmax in the input dtype (eager upcasts only to float32)
    ref = EuroBertForMaskedLM._from_config(cfg, attn_implementation="sdpa").to(dtype).eval()
    if family == "llada":
        sd = {llada_to_eurobert(k): v for k, v in sd.items()}
    res = ref.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    allowed_missing = set()
    if family == "dream":
        allowed_missing = {k for k in ref.state_dict() if k.endswith("o_proj.bias")}
    assert set(res.missing_keys) == allowed_missing, res.missing_keys
    with torch.no_grad():
        for k in allowed_missing:  # Dream has no output-projection bias
            ref.get_parameter(k).zero_()
    return ref


def eurobert(model, dtype=torch.float64):
    a = model.arch
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    return eurobert_from_state(model.spec.family, sd, vocab=a.vocab_size, d=a.d_model,
                               layers=a.n_layers, heads=a.n_heads, kv_heads=a.n_kv_heads,
                               mlp=a.mlp_hidden, eps=a.norm_eps, theta=a.rope_theta, dtype=dtype)


def eurobert_logits(ref, ids, mask):
    """Raw (unshifted) EuroBERT logits with the positions our convention prescribes."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------- naive reference
from reference_forward import align, naive_row, new_bank, weights  # noqa: E402


@pytest.fixture(scope="session")
def lib():
    return SimpleNamespace(
        make_model=make_model, canvas=canvas, commit=commit, eurobert=eurobert,
        eurobert_from_state=eurobert_from_state, eurobert_logits=eurobert_logits,
        llada_to_eurobert=llada_to_eurobert, rel_err=rel_err, weights=weights,
        new_bank=new_bank, naive_row=naive_row, align=align, deepcopy=copy.deepcopy,
        V=V, MASK_ID=MASK_ID, PAD_ID=PAD_ID)

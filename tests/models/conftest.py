"""Shared helpers for the model tests, exposed through the `lib` fixture.

Two references live here, both independent of dllm_decode's executor:
- `eurobert(model)`: transformers' EuroBertForMaskedLM loaded with the model's weights (LLaDA
  names renamed per MODELS.md §1.1, Dream names as they are, zero o_proj bias).
- `naive(...)`: a per-row, explicit re-implementation of one forward with stale-feature
  reuse (K/V bank, attention / FFN outputs, V-verify), written from ALGORITHMS.md §3 / §5 / §7.
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
_LLADA_TO_EUROBERT = [  # MODELS.md §1.1
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
def weights(model) -> SimpleNamespace:
    """Family-neutral float64 weights, read by the checkpoint names (not via the model's
    internals)."""
    sd = {k: v.to(torch.float64) for k, v in model.state_dict().items()}
    a = model.arch
    layers = []
    for i in range(a.n_layers):
        if model.spec.family == "llada":
            p = f"model.transformer.blocks.{i}."
            g = lambda n: sd.get(p + n)  # noqa: E731
            layers.append(dict(n1=g("attn_norm.weight"), wq=g("q_proj.weight"), bq=g("q_proj.bias"),
                               wk=g("k_proj.weight"), bk=g("k_proj.bias"), wv=g("v_proj.weight"),
                               bv=g("v_proj.bias"), wo=g("attn_out.weight"), n2=g("ff_norm.weight"),
                               wg=g("ff_proj.weight"), wu=g("up_proj.weight"), wd=g("ff_out.weight")))
        else:
            p = f"model.layers.{i}."
            g = lambda n: sd.get(p + n)  # noqa: E731
            layers.append(dict(n1=g("input_layernorm.weight"), wq=g("self_attn.q_proj.weight"),
                               bq=g("self_attn.q_proj.bias"), wk=g("self_attn.k_proj.weight"),
                               bk=g("self_attn.k_proj.bias"), wv=g("self_attn.v_proj.weight"),
                               bv=g("self_attn.v_proj.bias"), wo=g("self_attn.o_proj.weight"),
                               n2=g("post_attention_layernorm.weight"), wg=g("mlp.gate_proj.weight"),
                               wu=g("mlp.up_proj.weight"), wd=g("mlp.down_proj.weight")))
    if model.spec.family == "llada":
        emb, nf, head = (sd["model.transformer.wte.weight"], sd["model.transformer.ln_f.weight"],
                         sd["model.transformer.ff_out.weight"])
    else:
        emb, nf, head = sd["model.embed_tokens.weight"], sd["model.norm.weight"], sd["lm_head.weight"]
    return SimpleNamespace(layers=layers, emb=emb, nf=nf, head=head, H=a.n_heads, Hkv=a.n_kv_heads,
                           D=a.head_dim, eps=a.norm_eps, theta=a.rope_theta, d=a.d_model)


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _lin(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _rope(x, pos, W):
    """x (n, heads, D), pos (n,) -> rotated pairs (j, j + D/2) by angle pos * theta^(-2j/D).
    inv_freq in float32 like every reference rotary module."""
    D = W.D
    inv = (1.0 / (W.theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).double()
    ang = pos.double()[:, None, None] * inv                  # (n, 1, D/2)
    c, s = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def new_bank(W, L):
    return [dict(k=torch.zeros(L, W.Hkv, W.D, dtype=torch.float64),
                 v=torch.zeros(L, W.Hkv, W.D, dtype=torch.float64),
                 attn=torch.zeros(L, W.d, dtype=torch.float64),
                 ffn=torch.zeros(L, W.d, dtype=torch.float64),
                 valid=torch.zeros(L, dtype=torch.bool)) for _ in W.layers]


def naive_row(W, ids, mask, fed, *, bank=None, keys="fed", key_end=None, recompute=None,
              verify=None, rho=0.0, full_layers=()):
    """One forward for ONE row. ids (L,), mask (L,) bool, fed: list of canvas positions.
    keys='fed': attention over fed positions only. keys='bank': write fresh K/V of the
    recomputed positions into `bank` (a per-layer list of dicts, modified in place), then
    attend over valid, non-pad bank positions < key_end.
    recompute (list) / verify ((a, b)) / rho / full_layers: dLLM-Cache feature reuse, where
    fed positions outside the recomputed set add the bank's attention / FFN outputs.
    Returns raw logits (len(fed), V) float64."""
    L = ids.shape[0]
    key_end = L if key_end is None else key_end
    pos_all = (mask.long().cumsum(0) - 1).clamp(min=0)
    slot = {p: j for j, p in enumerate(fed)}
    reuse = recompute is not None
    x = W.emb[ids[fed]]                                                 # (f, d)
    for li, lw in enumerate(W.layers):
        h = _rms(x, lw["n1"], W.eps)
        if reuse and li not in full_layers:
            C = list(recompute)
            if verify is not None:
                va, vb = verify
                vn = _lin(h[[slot[p] for p in range(va, vb)]], lw["wv"], lw["bv"])   # (G, Hkv*D)
                vo = bank[li]["v"][va:vb].reshape(vb - va, -1)
                sim = torch.nn.functional.cosine_similarity(vn, vo, dim=-1)
                k = int(rho * (vb - va))
                C += [va + int(j) for j in torch.argsort(sim, stable=True)[:k]]
        else:
            C = list(fed)
        hC = h[[slot[p] for p in C]]
        q = _rope(_lin(hC, lw["wq"], lw["bq"]).view(len(C), W.H, W.D), pos_all[C], W)
        k = _rope(_lin(hC, lw["wk"], lw["bk"]).view(len(C), W.Hkv, W.D), pos_all[C], W)
        v = _lin(hC, lw["wv"], lw["bv"]).view(len(C), W.Hkv, W.D)
        if keys == "fed":
            K, Vv, kpos = k, v, C
            kmask = mask[C]
            if bank is not None:
                bank[li]["k"][C], bank[li]["v"][C] = k, v
                bank[li]["valid"][C] = True
        else:
            bank[li]["k"][C], bank[li]["v"][C] = k, v
            bank[li]["valid"][C] = True
            if reuse and li not in full_layers and verify is not None:
                bank[li]["v"][va:vb] = vn.view(vb - va, W.Hkv, W.D)
            kpos = list(range(key_end))
            K, Vv = bank[li]["k"][kpos], bank[li]["v"][kpos]
            kmask = bank[li]["valid"][kpos] & mask[kpos]
        if not kmask.any():
            kmask = torch.ones_like(kmask)
        rep = W.H // W.Hkv
        out = torch.empty(len(C), W.H, W.D, dtype=torch.float64)
        for hh in range(W.H):
            sc = (q[:, hh] @ K[:, hh // rep].T) / math.sqrt(W.D)       # (c, Lk)
            sc = sc.masked_fill(~kmask[None, :], float("-inf"))
            out[:, hh] = torch.softmax(sc, dim=-1) @ Vv[:, hh // rep]
        att = out.reshape(len(C), W.H * W.D) @ lw["wo"].T                    # (c, d)
        if reuse:
            bank[li]["attn"][C] = att
            x = x + bank[li]["attn"][fed]
            m = _lin(torch.nn.functional.silu(_lin(_rms(x[[slot[p] for p in C]], lw["n2"], W.eps),
                                                   lw["wg"], None))
                     * _lin(_rms(x[[slot[p] for p in C]], lw["n2"], W.eps), lw["wu"], None),
                     lw["wd"], None)
            bank[li]["ffn"][C] = m
            x = x + bank[li]["ffn"][fed]
        else:
            if bank is not None:
                bank[li]["attn"][C] = att
            x = x + att
            h2 = _rms(x, lw["n2"], W.eps)
            m = (torch.nn.functional.silu(h2 @ lw["wg"].T) * (h2 @ lw["wu"].T)) @ lw["wd"].T
            if bank is not None:
                bank[li]["ffn"][C] = m
            x = x + m
    return _rms(x, W.nf, W.eps) @ W.head.T


def align(raw, fed, shift: bool):
    """The aligned-logit rule: position p takes the raw logit of p - 1 if p - 1 was fed, else
    its own (the in-window quirk)."""
    if not shift:
        return raw
    slot = {p: j for j, p in enumerate(fed)}
    return torch.stack([raw[slot.get(p - 1, j)] if p > 0 else raw[j] for j, p in enumerate(fed)])


@pytest.fixture(scope="session")
def lib():
    return SimpleNamespace(
        make_model=make_model, canvas=canvas, commit=commit, eurobert=eurobert,
        eurobert_from_state=eurobert_from_state, eurobert_logits=eurobert_logits,
        llada_to_eurobert=llada_to_eurobert, rel_err=rel_err, weights=weights,
        new_bank=new_bank, naive_row=naive_row, align=align, deepcopy=copy.deepcopy,
        V=V, MASK_ID=MASK_ID, PAD_ID=PAD_ID)

"""A per-row, explicit re-implementation of one forward with stale-feature reuse (K/V bank,
attention / FFN outputs, V-verify), written from the cached forwards of NVlabs/Fast-dLLM
(``llada/generate.py``), maomaocun/dLLM-cache and Feng-Hong/WINO-DLLM (``LLaDA/decoding.py``),
independent of dllm_decode's executor. Its plain mode is checked against transformers' EuroBERT
(tests/models/test_models_parity.py); the model tests compare compute plans with it, and the
cache reference loops (reference_caches.py) decode with it."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

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
              verify=None, rho=0.0, full_layers=(), attention=None):
    """One forward for ONE row. ids (L,), mask (L,) bool, fed: list of canvas positions.
    keys='fed': attention over fed positions only. keys='bank': write fresh K/V of the
    recomputed positions into `bank` (a per-layer list of dicts, modified in place), then
    attend over valid, non-pad bank positions < key_end.
    recompute (list) / verify ((a, b)) / rho / full_layers: dLLM-Cache feature reuse, where
    fed positions outside the recomputed set add the bank's attention / FFN outputs.
    attention: a list that receives, per layer, the attention probabilities averaged over the
    heads (len(C), len(keys)) (HF eager attention's weights, read by d2Cache's rollout).
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
                # mirrored rule of the executor: similarities agreeing to 1e-9 are ties, broken
                # by position (unchanged inputs differ from cosine 1 only by rounding)
                sim = torch.round(sim / 1e-9) * 1e-9
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
        probs = []
        for hh in range(W.H):
            sc = (q[:, hh] @ K[:, hh // rep].T) / math.sqrt(W.D)       # (c, Lk)
            sc = sc.masked_fill(~kmask[None, :], float("-inf"))
            probs.append(torch.softmax(sc, dim=-1))
            out[:, hh] = probs[-1] @ Vv[:, hh // rep]
        if attention is not None:
            attention.append(sum(probs) / W.H)
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

"""A per-row, explicit re-implementation of one forward with stale-feature reuse (K/V bank,
attention / FFN outputs, V-verify), written from the cached forwards of NVlabs/Fast-dLLM
(``llada/generate.py``), maomaocun/dLLM-cache and Feng-Hong/WINO-DLLM (``LLaDA/decoding.py``),
independent of dllm_decode's executor. Its plain mode is checked against transformers' EuroBERT
(tests/models/test_models_parity.py); the model tests compare compute plans with it, and the
cache reference loops (reference_caches.py) decode with it.

For the block-diffusion families: the checkpoints' explicit block-causal 4D mask, transformers'
Qwen3 / Qwen2 models as SDAR / Fast-dLLM v2 references, and a plain per-row float64 LLaDA2
forward (router included); tests/models/test_models_block.py compares the models with them."""
from __future__ import annotations

import math
import types
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


# ---------------------------------------------------------------------- block-causal families

def block_causal_mask(mask, block):
    """The explicit 4D attention mask (B, 1, L, L) bool of the block-diffusion checkpoints'
    inference: query q sees key k when k is a real token and k's block is not after q's, blocks of
    `block` positions counted from each row's first real token (JetAstra/SDAR ``generate.py``,
    NVlabs/Fast-dLLM v2 ``eval_block_diff_mask``, inclusionAI LLaDA2 ``generate()``:
    ``tril(ones(blocks, blocks))`` repeated over the block positions)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    blk = pos // block
    return (mask[:, None, :] & (blk[:, None, :] <= blk[:, :, None]))[:, None]


def _float64_norms_and_rope(ref):
    """transformers' Qwen RMSNorm casts to float32 and its rotary module computes the angles in
    float32; run both in the model's float64, with the same formulas."""
    def rms(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x, position_ids):
        freqs = position_ids[..., None].double() * self.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for module in ref.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms, module)
    ref.model.rotary_emb.forward = types.MethodType(rope, ref.model.rotary_emb)
    return ref


def hf_reference(model, float64_casts=True):
    """Qwen3ForCausalLM (SDAR) / Qwen2ForCausalLM (Fast-dLLM v2) holding the model's tensors under
    the same names, in float64, SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    a = model.arch
    common = dict(vocab_size=a.vocab_size, hidden_size=a.d_model, intermediate_size=a.mlp_hidden,
                  num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                  rms_norm_eps=a.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
                  tie_word_embeddings=False, max_position_embeddings=4096)
    if model.spec.family == "sdar":
        cfg, cls = Qwen3Config(head_dim=a.head_dim, attention_bias=a.qkv_bias, **common), Qwen3ForCausalLM
    else:
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    ref = cls._from_config(cfg, attn_implementation="sdpa").to(torch.float64).eval()
    ref.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()}, strict=True)
    return _float64_norms_and_rope(ref) if float64_casts else ref


def hf_logits(ref, ids, mask, block):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=block_causal_mask(mask, block), position_ids=pos).logits


def llada2_forward(sd, c, ids, mask, block):
    """One row of LLaDA2MoeModelLM's forward with the block-causal mask of its generate(), in
    plain float64, re-derived from inclusionAI LLaDA2.0-mini ``modeling_llada2_moe.py`` (the gate
    and layers as in inclusionAI/dInfer ``python/dinfer/model/modeling_llada2_moe.py``) and read
    straight from the checkpoint's tensors `sd` and config.json keys `c`. ids (L,), mask (L,)
    bool -> raw logits (L, V)."""
    sd = {k: v.to(torch.float64) for k, v in sd.items()}
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or c["hidden_size"] // H
    eps = c["rms_norm_eps"]
    L = ids.shape[0]
    pos = (mask.long().cumsum(0) - 1).clamp(min=0)
    see = block_causal_mask(mask[None], block)[0, 0]                        # (L, L)
    rot = int(D * c["partial_rotary_factor"])
    inv = (1.0 / (c["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))).double()
    ang = pos.double()[:, None] * inv                                       # (L, rot/2)

    def rope(t):                                                            # (L, heads, D)
        c_, s_ = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
        a, b, rest = t[..., : rot // 2], t[..., rot // 2: rot], t[..., rot:]
        return torch.cat((a * c_ - b * s_, b * c_ + a * s_, rest), dim=-1)

    x = sd["model.word_embeddings.weight"][ids]                             # (L, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = _lin(h, sd[p + "attention.query_key_value.weight"], sd.get(p + "attention.query_key_value.bias"))
        q = qkv[:, : H * D].reshape(L, H, D)
        k = qkv[:, H * D: (H + Hkv) * D].reshape(L, Hkv, D)
        v = qkv[:, (H + Hkv) * D:].reshape(L, Hkv, D)
        if c.get("use_qk_norm", True):
            q = _rms(q, sd[p + "attention.query_layernorm.weight"], eps)
            k = _rms(k, sd[p + "attention.key_layernorm.weight"], eps)
        q, k = rope(q), rope(k)
        out = torch.empty(L, H, D, dtype=torch.float64)
        for hh in range(H):
            kv = hh // (H // Hkv)
            sc = (q[:, hh] @ k[:, kv].T) / math.sqrt(D)
            out[:, hh] = torch.softmax(sc.masked_fill(~see, float("-inf")), dim=-1) @ v[:, kv]
        x = x + _lin(out.reshape(L, H * D), sd[p + "attention.dense.weight"], sd.get(p + "attention.dense.bias"))
        h2 = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        if c.get("num_experts") is not None and i >= c.get("first_k_dense_replace", 0):
            x = x + torch.stack([_llada2_moe_token(sd, c, p + "mlp.", h2[t]) for t in range(L)])
        else:
            x = x + _swiglu(sd, p + "mlp.", h2)
    head = sd["model.word_embeddings.weight"] if c.get("tie_word_embeddings") else sd["lm_head.weight"]
    return _rms(x, sd["model.norm.weight"], eps) @ head.T


def _swiglu(sd, p, h):
    return (torch.nn.functional.silu(h @ sd[p + "gate_proj.weight"].T) * (h @ sd[p + "up_proj.weight"].T)) \
        @ sd[p + "down_proj.weight"].T


def _llada2_moe_token(sd, c, p, h):
    """One token through LLaDA2MoeSparseMoeBlock: the gate (sigmoid scores; expert_bias added for
    choosing only; the topk_group groups with the largest sum of their two best biased scores;
    the top-k biased scores inside them; weights = unbiased scores / (their sum + 1e-20) when
    k > 1, times routed_scaling_factor), the chosen experts, plus the shared expert."""
    E, G, k = c["num_experts"], c["n_group"], c["num_experts_per_tok"]
    scores = torch.sigmoid(sd[p + "gate.weight"] @ h)                       # (E,)
    biased = scores + sd[p + "gate.expert_bias"]
    per = E // G
    group_score = [sum(sorted(biased[g * per:(g + 1) * per].tolist(), reverse=True)[:2]) for g in range(G)]
    groups = sorted(range(G), key=lambda g: -group_score[g])[: c["topk_group"]]
    allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
    chosen = sorted(allowed, key=lambda e: -float(biased[e]))[:k]
    w = scores[chosen]
    if k > 1:
        w = w / (w.sum() + 1e-20)
    w = w * c["routed_scaling_factor"]
    y = sum(w[j] * _swiglu(sd, f"{p}experts.{e}.", h) for j, e in enumerate(chosen))
    if c.get("num_shared_experts"):
        y = y + _swiglu(sd, p + "shared_experts.", h)
    return y


def glm4_moe_reference(sd, c):
    """transformers' Glm4MoeForCausalLM (GLM-4.5's MoE) holding LLaDA2 tensors `sd` (config.json
    keys `c`), in float64: the same blocks (q/k RMSNorm, partial half-split RoPE, first layers
    dense) and the same router maths (sigmoid scores, a correction bias for choosing, groups
    ranked by their two best scores, normalised top-k weights times the scaling factor, a shared
    expert), under other names: the fused query_key_value split into q/k/v, the experts stacked.
    Its gate computes in float32, as LLaDA2's official gate does. Used to check
    llada2_forward."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or c["hidden_size"] // H
    cfg = Glm4MoeConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
        rms_norm_eps=c["rms_norm_eps"], attention_bias=c.get("use_qkv_bias", False), use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"],
                         "partial_rotary_factor": c["partial_rotary_factor"]},
        n_routed_experts=c["num_experts"], num_experts_per_tok=c["num_experts_per_tok"], n_group=c["n_group"],
        topk_group=c["topk_group"], n_shared_experts=c["num_shared_experts"],
        moe_intermediate_size=c["moe_intermediate_size"], routed_scaling_factor=c["routed_scaling_factor"],
        first_k_dense_replace=c["first_k_dense_replace"], norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=4096)
    ref = Glm4MoeForCausalLM._from_config(cfg, attn_implementation="sdpa", experts_implementation="eager")
    ref = ref.to(torch.float64).eval()
    rename = (("model.word_embeddings", "model.embed_tokens"), ("attention.query_layernorm", "self_attn.q_norm"),
              ("attention.key_layernorm", "self_attn.k_norm"), ("attention.dense", "self_attn.o_proj"),
              ("mlp.gate.expert_bias", "mlp.gate.e_score_correction_bias"))
    new = {}
    for k, v in sd.items():
        if ".mlp.experts." in k:
            continue
        if "query_key_value" in k:
            p, kind = k.split("attention.query_key_value.")
            for x, t in zip("qkv", v.split((H * D, Hkv * D, Hkv * D))):
                new[f"{p}self_attn.{x}_proj.{kind}"] = t
            continue
        for a, b in rename:
            k = k.replace(a, b)
        new[k] = v
    for i in range(c["first_k_dense_replace"], c["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        E = range(c["num_experts"])
        new[p + "gate_up_proj"] = torch.stack([torch.cat([sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"]])
                                               for e in E])
        new[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in E])
    ref.load_state_dict({k: v.to(torch.float64) for k, v in new.items()}, strict=True)
    return _float64_norms_and_rope(ref)

"""Start a diffusion model from an autoregressive checkpoint's weights.

Dream-7B was adapted from Qwen2.5-7B: the same weights, attention made bidirectional, the raw
logit at position i kept as the prediction of token i+1 (Dream's shifted logits), then
masked-diffusion training. ``train --family dream --init AR_DIR`` does the same with an AR model
this script wrote: Dream's parameter names are the LLaMA/Qwen2 ones, and its q/k/v biases (which
LLaMA lacks) start at zero, so the adapted model's first forward equals the AR model's run without
the causal mask. ``--family llada --init AR_DIR`` maps the same weights onto LLaDA's names; LLaDA
predicts token i at position i, so there the head starts one position off and training realigns it.
``--family sdar --init AR_DIR`` does what SDAR does with Qwen3 (arXiv 2510.06303): the same
weights under the same names, Qwen3's per-head q/k RMSNorm added at weight one (the one change to
the AR model's function, which training absorbs), the block-causal attention and no logit shift,
then block-diffusion training (``train.block_diffusion_loss``). ``--family fast_dllm_v2 --init
AR_DIR`` does what Fast-dLLM v2 does with Qwen2.5 (arXiv 2509.26328): Dream's mapping (q/k/v biases
at zero, logits shifted as the AR model's are), block-causal attention, then its block diffusion
with complementary masks (``train.shifted_block_diffusion_loss``). With blocks of one position the
adapted model's first forward is the AR model's.
"""

from __future__ import annotations

import re

import torch

# LLaMA name -> LLaDA name (the rest of the name is kept)
_LLADA_NAMES = (
    (r"^model\.embed_tokens\.", "model.transformer.wte."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"model.transformer.blocks.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"model.transformer.blocks.\1.\2_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"model.transformer.blocks.\1.attn_out."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.transformer.blocks.\1.ff_norm."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"model.transformer.blocks.\1.ff_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"model.transformer.blocks.\1.up_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"model.transformer.blocks.\1.ff_out."),
    (r"^model\.norm\.", "model.transformer.ln_f."),
    (r"^lm_head\.", "model.transformer.ff_out."),
)


def _rename(name: str, family: str) -> str:
    if family in ("dream", "sdar", "fast_dllm_v2"):     # LLaMA's names (Qwen2 / Qwen3 layouts)
        return name
    for pattern, repl in _LLADA_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"AR parameter {name!r} has no LLaDA counterpart")


def load_ar_weights_(model: torch.nn.Module, ar_state: dict[str, torch.Tensor], family: str, source: str) -> None:
    """Copy an AR (LlamaForCausalLM) state dict into diffusion `model` of `family` in place. Every
    AR tensor must land on a parameter of the same shape; the only parameters it has none for are
    Dream's and Fast-dLLM v2's q/k/v biases (set to zero) and SDAR's q/k norms (set to one)."""
    own = model.state_dict()
    mapped = {_rename(k, family): v for k, v in ar_state.items() if not k.endswith("rotary_emb.inv_freq")}
    for k, v in mapped.items():
        if k not in own:
            raise ValueError(f"--init {source}: AR parameter maps to {k!r}, which the {family} model lacks")
        if own[k].shape != v.shape:
            raise ValueError(f"--init {source}: {k} has shape {tuple(v.shape)} in the AR checkpoint, "
                             f"{tuple(own[k].shape)} in the {family} model (same --d-model, --n-heads, "
                             "--n-kv-heads, --mlp-hidden as the AR run?)")
    left = [k for k in own if k not in mapped]
    # Dream's q/k/v biases start at zero; SDAR's per-head q/k RMSNorm (Qwen3's) at weight one
    if any(not re.search(r"self_attn\.([qkv]_proj\.bias|[qk]_norm\.weight)$", k) for k in left):
        raise ValueError(f"--init {source}: the AR checkpoint has no weights for {left[:3]}")
    model.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        for k in left:
            model.get_parameter(k).fill_(1.0 if k.endswith("norm.weight") else 0.0)

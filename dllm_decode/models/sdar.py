"""SDAR family (JetAstra/SDAR: SDAR-1.7B / 4B / 8B-Chat, ``SDARForCausalLM``): a block-diffusion
model on the Qwen3 layout, re-derived from the checkpoints' ``modeling_sdar.py`` and
``generate.py`` (JetAstra/SDAR, ``training/model/SDAR-8B-Chat/``):

- Qwen3 blocks: RMSNorm, GQA with an explicit ``head_dim`` (SDAR-4B: 32 heads x 128 on a 2560
  hidden size), per-head RMSNorm of q and k (``q_norm`` / ``k_norm``) before half-split RoPE,
  q/k/v/o biases only with ``attention_bias``, SwiGLU MLP, untied head unless
  ``tie_word_embeddings``;
- block-causal attention: ``generate.py`` builds ``tril(ones(blocks, blocks))`` repeated over
  ``block_length`` positions (blocks counted from the prompt's first token), prefills the whole
  prompt blocks into the K/V cache and then denoises one block at a time against it. The block
  size is the config's ``block_size`` (4, generate.py's default ``block_length``);
- logits at position i predict token i (no shift);
- mask id: the config's ``mask_token_id`` (151669), else the tokenizer's mask token, as
  generate.py reads it; EOS the config's ``eos_token_id``; pad the tokenizer's pad token (the
  config has none), else EOS; turn end ``<|im_end|>`` from the tokenizer.

Parameter names are the checkpoint's own:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight        self_attn.{q,k,v,o}_proj.weight (+ .bias)
    model.layers.{i}.self_attn.{q,k}_norm.weight   post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                 absent if tie_word_embeddings

Deviation: SDAR's RMSNorm calls flash-attn's fused Triton kernel, which applies the weight in
float32 before casting back; ours does the same (``RMSNorm(weight_upcast=True)``), in plain
torch. Absent config keys take ``configuration_sdar.py``'s defaults.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .denoiser import Arch, BlockParts, ModelSpec
from .dream import QwenLayoutModel, qwen_arch, qwen_config
from .layers import GatedMLP, RMSNorm

__all__ = ["SDARConfig", "SDARModel"]


@dataclass
class SDARConfig:
    """SDAR's config.json (Qwen3 field names plus ``block_size`` / ``mask_token_id``); defaults
    are configuration_sdar.py's, used only for keys a config.json leaves out."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None    # not in the Hub config: the tokenizer's pad, else EOS
    mask_token_id: int | None = None   # else the tokenizer's mask token (generate.py)
    block_size: int = 4                # generate.py's default block_length
    eot_token_id: int | None = None    # not in the Hub config; filled from the tokenizer

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "SDARConfig":
        return qwen_config(cls, d, source, "SDAR")

    def to_dict(self) -> dict:
        """The config.json an SDAR checkpoint ships (real field names, real auto_map)."""
        d = asdict(self)
        for key in ("eot_token_id", "pad_token_id"):
            if d[key] is None:
                d.pop(key)
        d.update({
            "architectures": ["SDARForCausalLM"],
            "model_type": "sdar",
            "auto_map": {
                "AutoConfig": "configuration_sdar.SDARConfig",
                "AutoModel": "modeling_sdar.SDARModel",
                "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
            },
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
        })
        return d

    def arch(self) -> Arch:
        return qwen_arch(self, self.head_dim, qkv_bias=self.attention_bias)

    def spec(self) -> ModelSpec:
        if self.mask_token_id is None:
            raise ValueError("SDAR config has no mask_token_id and no tokenizer names a mask token")
        eos = self.eos_token_id
        return ModelSpec(family="sdar", vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                         eos_token_id=eos, pad_token_id=eos if self.pad_token_id is None else self.pad_token_id,
                         eot_token_id=self.eot_token_id, max_length=self.max_position_embeddings,
                         shift_logits=False, block_size=self.block_size)


class SDARAttention(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        hd, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self.q_proj = nn.Linear(a.d_model, hd, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.d_model, kv, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.d_model, kv, bias=a.qkv_bias)
        self.o_proj = nn.Linear(hd, a.d_model, bias=a.qkv_bias)    # attention_bias covers o too
        self.q_norm = RMSNorm(a.head_dim, a.norm_eps, weight_upcast=True)
        self.k_norm = RMSNorm(a.head_dim, a.norm_eps, weight_upcast=True)


class SDARLayer(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.self_attn = SDARAttention(a)
        self.mlp = GatedMLP(a.d_model, a.mlp_hidden)
        self.input_layernorm = RMSNorm(a.d_model, a.norm_eps, weight_upcast=True)
        self.post_attention_layernorm = RMSNorm(a.d_model, a.norm_eps, weight_upcast=True)

    def parts(self) -> BlockParts:
        at, m = self.self_attn, self.mlp
        return BlockParts(self.input_layernorm, at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                          self.post_attention_layernorm, m.gate_proj, m.up_proj, m.down_proj,
                          q_norm=at.q_norm, k_norm=at.k_norm)


class SDARModel(QwenLayoutModel):
    layer_class = SDARLayer
    norm_weight_upcast = True

"""Fast-dLLM v2 family (NVlabs/Fast-dLLM ``v2/``; checkpoints Efficient-Large-Model/Fast_dLLM_v2_7B
and _1.5B, ``Fast_dLLM_QwenForCausalLM``): a block-diffusion model fine-tuned from Qwen2.5-Instruct,
re-derived from the checkpoints' ``modeling.py`` / ``configuration.py`` and the ``v2/``
generation and evaluation code:

- Qwen2.5 blocks, exactly Dream's layer (dream.py): RMSNorm, GQA, q/k/v biases, no o bias,
  half-split RoPE with tables cast to the model dtype, SwiGLU, untied head unless
  ``tie_word_embeddings``;
- block-causal attention at inference (``eval_block_diff_mask``: query block >= key block,
  blocks of ``block_size`` positions counted from the first token; the forward's default block
  size is 32, the config's ``bd_size``): the prompt's whole blocks are prefilled into the K/V
  cache and each block is denoised against it, in sub-blocks of ``small_block_size`` positions
  (a decoding choice, not the model's);
- token shift: the raw logit at i predicts token i+1; the generation shifts a fed block's logits
  right by one with the block's first position keeping its own (that position is always
  already decoded there), as Dream's samplers do, so ``forward()`` re-aligns them like Dream's;
- mask id: the config's ``mask_token_id`` if present, else 151665 (``|<MASK>|``, the value the
  v2 code passes everywhere); EOS: the config's ``eos_token_id`` (151645, ``<|im_end|>``, also
  the generation's default ``stop_token``); pad: the config's ``pad_token_id``, else EOS.

Parameter names are the checkpoint's own (Qwen2's):

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight          self_attn.{q,k,v}_proj.{weight,bias}
    model.layers.{i}.self_attn.o_proj.weight         post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                   absent if tie_word_embeddings

Absent config keys take ``configuration.py``'s (Qwen2's) defaults; ``layer_types`` other than
``full_attention`` and ``use_sliding_window`` are refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


from .denoiser import Arch, ModelSpec
from .dream import DreamLayer, QwenLayoutModel, qwen_arch, qwen_config

__all__ = ["FastDLLMv2Config", "FastDLLMv2Model"]


@dataclass
class FastDLLMv2Config:
    """Fast_dLLM_QwenConfig's config.json (Qwen2 field names plus ``bd_size``); defaults are
    configuration.py's, used only for keys a config.json leaves out."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list | None = None
    bos_token_id: int | None = None
    eos_token_id: int = 151645           # the v2 generation's stop_token default
    pad_token_id: int | None = None
    mask_token_id: int = 151665          # not in the Hub config; the v2 code's mask_id
    bd_size: int = 32
    eot_token_id: int | None = None      # not in the Hub config; filled from the tokenizer

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "FastDLLMv2Config":
        other = sorted({t for t in d.get("layer_types") or () if t != "full_attention"})
        if other:
            raise ValueError(f"{source}: Fast-dLLM v2 config has layer_types {other}; only 'full_attention' "
                             "is supported")
        return qwen_config(cls, d, source, "Fast-dLLM v2", skip_none=True)

    def to_dict(self) -> dict:
        """The config.json a Fast-dLLM v2 checkpoint ships (real field names, real auto_map)."""
        d = asdict(self)
        d["layer_types"] = ["full_attention"] * self.num_hidden_layers
        for key in ("eot_token_id", "pad_token_id", "bos_token_id"):
            if d[key] is None:
                d.pop(key)
        d.update({
            "architectures": ["Fast_dLLM_QwenForCausalLM"],
            "model_type": "Fast_dLLM_Qwen",
            "auto_map": {
                "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                "AutoModel": "modeling.Fast_dLLM_QwenModel",
                "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
            },
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
        })
        return d

    def arch(self) -> Arch:
        return qwen_arch(self, self.head_dim, qkv_bias=True)

    def spec(self) -> ModelSpec:
        eos = self.eos_token_id
        return ModelSpec(family="fast_dllm_v2", vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                         eos_token_id=eos, pad_token_id=eos if self.pad_token_id is None else self.pad_token_id,
                         eot_token_id=self.eot_token_id, max_length=self.max_position_embeddings,
                         shift_logits=True, block_size=self.bd_size)


class FastDLLMv2Model(QwenLayoutModel):
    layer_class = DreamLayer

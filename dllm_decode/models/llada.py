"""LLaDA family (LLaDA-8B-Base / -Instruct, LLaDA-1.5): LLaMA-like, bidirectional attention,
RMSNorm, half-split RoPE, SwiGLU (`ff_proj` is the gate), untied head; logits at position i
predict token i. Modules carry the checkpoint's own (OLMo-derived) parameter names, so its
safetensors load without renaming:

    model.transformer.wte.weight                    (embedding_size, d)
    model.transformer.blocks.{i}.attn_norm.weight   q_proj / k_proj / v_proj / attn_out
    model.transformer.blocks.{i}.ff_norm.weight     ff_proj (gate) / up_proj / ff_out (down)
    model.transformer.ln_f.weight
    model.transformer.ff_out.weight                 (embedding_size, d), absent if weight_tying
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from torch import Tensor, nn

from .denoiser import Arch, BlockParts, Denoiser, ModelSpec
from .layers import RMSNorm

__all__ = ["LLaDAConfig", "LLaDAModel"]

# config.json fields whose value we must refuse to ignore: (field, supported value)
_REQUIRED = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
    "alibi": False, "include_bias": False, "attention_layer_norm": False,
    "input_emb_norm": False, "layer_norm_with_affine": True,
}


@dataclass
class LLaDAConfig:
    """LLaDA's config.json, OLMo field names (defaults = LLaDA-8B)."""
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = 32
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    rope_full_precision: bool = True
    include_qkv_bias: bool = False
    weight_tying: bool = False
    scale_logits: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    eot_token_id: int | None = None   # not in the Hub config; filled from the tokenizer
    # fields we only accept at their LLaDA value (see _REQUIRED)
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    rope: bool = True
    alibi: bool = False
    include_bias: bool = False
    attention_layer_norm: bool = False
    input_emb_norm: bool = False
    layer_norm_with_affine: bool = True
    multi_query_attention: bool | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LLaDAConfig":
        for key, want in _REQUIRED.items():
            if key in d and d[key] is not None and d[key] != want:
                raise ValueError(f"{source}: LLaDA config has {key}={d[key]!r}; only {want!r} is supported")
        if d.get("multi_query_attention") and d.get("n_kv_heads") in (None, 1):
            d = {**d, "n_kv_heads": 1}
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.n_kv_heads is None:
            cfg.n_kv_heads = cfg.n_heads
        if cfg.embedding_size is None:
            cfg.embedding_size = cfg.vocab_size
        if cfg.mlp_hidden_size is None:
            cfg.mlp_hidden_size = cfg.mlp_ratio * cfg.d_model
        return cfg

    def to_dict(self) -> dict:
        """The config.json a LLaDA checkpoint ships (real field names, real auto_map)."""
        d = asdict(self)
        if d["eot_token_id"] is None:
            d.pop("eot_token_id")
        d.update({
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "auto_map": {
                "AutoConfig": "configuration_llada.LLaDAConfig",
                "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            },
            "bias_for_layer_norm": False, "attention_dropout": 0.0, "residual_dropout": 0.0,
            "embedding_dropout": 0.0, "use_cache": False, "init_device": "meta",
            "flash_attention": False,
        })
        return d

    def arch(self) -> Arch:
        return Arch(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.d_model // self.n_heads,
                    mlp_hidden=self.mlp_hidden_size, vocab_size=self.embedding_size,
                    rope_theta=float(self.rope_theta), norm_eps=self.rms_norm_eps,
                    rope_full_precision=self.rope_full_precision,
                    qkv_bias=self.include_qkv_bias, tied=self.weight_tying,
                    logit_scale=1.0 / math.sqrt(self.d_model) if self.scale_logits else 1.0)

    def spec(self) -> ModelSpec:
        return ModelSpec(family="llada", vocab_size=self.embedding_size,
                         mask_token_id=self.mask_token_id, eos_token_id=self.eos_token_id,
                         pad_token_id=self.pad_token_id, eot_token_id=self.eot_token_id,
                         max_length=self.max_sequence_length, shift_logits=False)


class LLaDABlock(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        kv = a.n_kv_heads * a.head_dim
        self.attn_norm = RMSNorm(a.d_model, a.norm_eps)
        self.q_proj = nn.Linear(a.d_model, a.d_model, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.d_model, kv, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.d_model, kv, bias=a.qkv_bias)
        self.attn_out = nn.Linear(a.d_model, a.d_model, bias=False)
        self.ff_norm = RMSNorm(a.d_model, a.norm_eps)
        self.ff_proj = nn.Linear(a.d_model, a.mlp_hidden, bias=False)   # gate (activated branch)
        self.up_proj = nn.Linear(a.d_model, a.mlp_hidden, bias=False)
        self.ff_out = nn.Linear(a.mlp_hidden, a.d_model, bias=False)

    def parts(self) -> BlockParts:
        return BlockParts(self.attn_norm, self.q_proj, self.k_proj, self.v_proj, self.attn_out,
                          self.ff_norm, self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModel(Denoiser):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.arch = a = config.arch()
        self.spec = config.spec()
        self.model = nn.Module()
        t = nn.ModuleDict({
            "wte": nn.Embedding(a.vocab_size, a.d_model),
            "blocks": nn.ModuleList(LLaDABlock(a) for _ in range(a.n_layers)),
            "ln_f": RMSNorm(a.d_model, a.norm_eps),
        })
        if not a.tied:
            t["ff_out"] = nn.Linear(a.d_model, a.vocab_size, bias=False)
        self.model.transformer = t

    def embed_weight(self) -> Tensor:
        return self.model.transformer.wte.weight

    def head_weight(self) -> Tensor:
        t = self.model.transformer
        return t.wte.weight if self.arch.tied else t.ff_out.weight

    def final_norm(self) -> RMSNorm:
        return self.model.transformer.ln_f

    def block_parts(self) -> list[BlockParts]:
        return [b.parts() for b in self.model.transformer.blocks]

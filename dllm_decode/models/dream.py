"""Dream family (Dream-v0-Base-7B / -Instruct-7B and relatives): Qwen2 layout with q/k/v
biases (no o_proj bias), grouped-query attention, bidirectional. Adapted from an AR model, so
its raw logit at i predicts token i+1; forward() re-aligns them, as HKUNLP/Dream's
``generation_utils.py`` does. Parameter names are the checkpoint's own:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight          self_attn.{q,k,v}_proj.{weight,bias}
    model.layers.{i}.self_attn.o_proj.weight
    model.layers.{i}.post_attention_layernorm.weight mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                   absent if tie_word_embeddings
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from torch import Tensor, nn

from .denoiser import Arch, BlockParts, Denoiser, ModelSpec
from .layers import RMSNorm

__all__ = ["DreamConfig", "DreamModel"]


@dataclass
class DreamConfig:
    """Dream's config.json, Qwen2 field names (defaults = Dream-v0-7B)."""
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    eos_token_id: int = 151643
    bos_token_id: int | None = 151643
    eot_token_id: int | None = None   # not in the Hub config; filled from the tokenizer
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    use_sliding_window: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "DreamConfig":
        return qwen_config(cls, d, source, "Dream")

    def to_dict(self) -> dict:
        """The config.json a Dream checkpoint ships (real field names, real auto_map)."""
        d = asdict(self)
        if d["eot_token_id"] is None:
            d.pop("eot_token_id")
        d.update({
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "auto_map": {
                "AutoConfig": "configuration_dream.DreamConfig",
                "AutoModel": "modeling_dream.DreamModel",
            },
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
            "sliding_window": None, "max_window_layers": self.num_hidden_layers,
        })
        return d

    def arch(self) -> Arch:
        return qwen_arch(self, self.hidden_size // self.num_attention_heads, qkv_bias=True)

    def spec(self) -> ModelSpec:
        return ModelSpec(family="dream", vocab_size=self.vocab_size,
                         mask_token_id=self.mask_token_id, eos_token_id=self.eos_token_id,
                         pad_token_id=self.pad_token_id, eot_token_id=self.eot_token_id,
                         max_length=self.max_position_embeddings, shift_logits=True)


def qwen_config(cls, d: dict, source: str, what: str, skip_none: bool = False):
    """A Qwen2-layout config dataclass `cls` from a config.json dict `d`, refusing what the
    shared layer cannot run (naming `source` and the key): the fields `cls` declares, EOS as
    its first id when a list, key/value heads and head_dim defaulted as transformers does.
    `skip_none`: a key given as null keeps the field's default."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: {what} config has hidden_act={d['hidden_act']!r}; only 'silu' is supported")
    rs = d.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
        raise ValueError(f"{source}: {what} config has rope_scaling={rs!r}; only default RoPE is supported")
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: {what} config has use_sliding_window=true; not supported")
    names = {f.name for f in fields(cls)}
    cfg = cls(**{k: v for k, v in d.items() if k in names and not (skip_none and v is None)})
    if isinstance(cfg.eos_token_id, list):
        cfg.eos_token_id = cfg.eos_token_id[0]
    if cfg.num_key_value_heads is None:
        cfg.num_key_value_heads = cfg.num_attention_heads
    if getattr(cfg, "head_dim", 0) is None:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg


def qwen_arch(cfg, head_dim: int, qkv_bias: bool) -> Arch:
    """The executor's Arch of a Qwen2-layout config (Dream, Fast-dLLM v2, SDAR)."""
    return Arch(d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, mlp_hidden=cfg.intermediate_size,
                vocab_size=cfg.vocab_size, rope_theta=float(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
                rope_full_precision=False, qkv_bias=qkv_bias, tied=cfg.tie_word_embeddings)


class DreamAttention(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        kv = a.n_kv_heads * a.head_dim
        self.q_proj = nn.Linear(a.d_model, a.n_heads * a.head_dim, bias=True)
        self.k_proj = nn.Linear(a.d_model, kv, bias=True)
        self.v_proj = nn.Linear(a.d_model, kv, bias=True)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.d_model, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.d_model, a.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(a.d_model, a.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(a.mlp_hidden, a.d_model, bias=False)


class DreamLayer(nn.Module):
    def __init__(self, a: Arch) -> None:
        super().__init__()
        self.self_attn = DreamAttention(a)
        self.mlp = DreamMLP(a)
        self.input_layernorm = RMSNorm(a.d_model, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.d_model, a.norm_eps)

    def parts(self) -> BlockParts:
        at, m = self.self_attn, self.mlp
        return BlockParts(self.input_layernorm, at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                          self.post_attention_layernorm, m.gate_proj, m.up_proj, m.down_proj)


class QwenLayoutModel(Denoiser):
    """The Qwen2 checkpoint layout Dream, Fast-dLLM v2 and SDAR share: `model.embed_tokens`,
    `model.layers`, `model.norm` and an untied `lm_head`. A family names its layer class and
    whether its final norm multiplies the weight in float32 (Qwen3 / SDAR)."""
    layer_class: type[nn.Module]
    norm_weight_upcast: bool = False

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.arch = a = config.arch()
        self.spec = config.spec()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(a.vocab_size, a.d_model)
        self.model.layers = nn.ModuleList(self.layer_class(a) for _ in range(a.n_layers))
        self.model.norm = RMSNorm(a.d_model, a.norm_eps, weight_upcast=self.norm_weight_upcast)
        if not a.tied:
            self.lm_head = nn.Linear(a.d_model, a.vocab_size, bias=False)

    def embed_weight(self) -> Tensor:
        return self.model.embed_tokens.weight

    def head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.arch.tied else self.lm_head.weight

    def final_norm(self) -> RMSNorm:
        return self.model.norm

    def block_parts(self) -> list[BlockParts]:
        return [layer.parts() for layer in self.model.layers]


class DreamModel(QwenLayoutModel):
    layer_class = DreamLayer

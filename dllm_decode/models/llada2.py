"""LLaDA2 family (inclusionAI LLaDA2.0-mini / -flash and 2.1, ``LLaDA2MoeModelLM``): a block-diffusion
mixture-of-experts model, re-derived from the checkpoints' ``modeling_llada2_moe.py`` /
``configuration_llada2_moe.py`` (inclusionAI/LLaDA2.0-mini on the Hub; the same gate and layer
code in inclusionAI/dInfer ``python/dinfer/model/modeling_llada2_moe.py``):

- attention: a fused ``query_key_value`` projection (rows: q heads, then k, then v), per-head
  RMSNorm of q and k (``query_layernorm`` / ``key_layernorm``, with ``use_qk_norm``), RoPE on the
  first ``head_dim * partial_rotary_factor`` features of each head (half-split within them, the
  rest passed through), GQA, output projection ``dense`` (bias with ``use_bias``);
- FFN: the first ``first_k_dense_replace`` layers are dense SwiGLU MLPs (``intermediate_size``);
  the others a mixture of experts: the router ``gate`` scores ``sigmoid(W h)`` (in float32),
  adds ``expert_bias`` for choosing only, keeps the ``topk_group`` of ``n_group`` expert groups
  whose two best biased scores sum highest, takes the ``num_experts_per_tok`` best biased scores
  among them, weights those experts by their unbiased scores normalised to sum 1 (+1e-20; when
  more than one is chosen) times ``routed_scaling_factor``, and adds the always-on
  ``shared_experts`` MLP (``num_shared_experts * moe_intermediate_size`` wide);
- block-causal attention: the official ``generate()`` (and dInfer's block-diffusion loop) builds
  ``tril(ones(blocks, blocks))`` repeated over ``block_length`` = 32 positions counted from the
  first token, prefills the prompt's whole blocks and denoises one block at a time;
- logits at position i predict token i (no shift);
- mask id 156895 and EOS 156892 (``<|endoftext|>``): the official ``generate()`` defaults
  (``mask_id`` / ``eos_id``; the config names neither), unless the config has
  ``mask_token_id`` / ``eos_token_id``; pad: the config's ``pad_token_id`` (156892); turn end
  ``<|role_end|>`` from the tokenizer.

Parameter names are the checkpoint's own:

    model.word_embeddings.weight
    model.layers.{i}.input_layernorm.weight                 post_attention_layernorm.weight
    model.layers.{i}.attention.query_key_value.weight       (+ .bias with use_qkv_bias)
    model.layers.{i}.attention.{query,key}_layernorm.weight
    model.layers.{i}.attention.dense.weight                 (+ .bias with use_bias)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight         dense layers
    model.layers.{i}.mlp.gate.weight, mlp.gate.expert_bias  MoE layers: router,
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   experts,
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight  shared expert
    model.norm.weight
    lm_head.weight                                          absent if tie_word_embeddings

Deviations: the official gate computes in float32 whatever the model dtype; ours in the wider of
float32 and the model dtype (float32 for bf16 / float32 models, as the official; float64 for
float64 models, like our norms and RoPE tables), and the experts' weighted sum in that dtype too.
The config's ``norm_topk_prob`` is not read, as the official gate does not (it normalises
whenever more than one expert is chosen). ``expert_bias`` keeps the model dtype, as the official
buffer does (dInfer keeps it in float32). Absent config keys take
``configuration_llada2_moe.py``'s defaults.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoiser import Arch, BlockParts, Denoiser, ModelSpec
from .layers import GatedMLP, RMSNorm, moe_combine

__all__ = ["LLaDA2Config", "LLaDA2Model"]

_BLOCK = 32   # the official generate()'s block_length


@dataclass
class LLaDA2Config:
    """LLaDA2MoeConfig's config.json; defaults are configuration_llada2_moe.py's, used only for
    keys a config.json leaves out."""
    vocab_size: int = 30592
    hidden_size: int = 1024
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 0
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = True
    rms_norm_eps: float = 1e-5
    norm_head: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 16384
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    use_sliding_window: bool = False
    pad_token_id: int | None = 126081
    num_experts: int | None = 16
    num_shared_experts: int | None = 0
    num_experts_per_tok: int = 2
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    score_function: str = "sigmoid"
    mask_token_id: int = 156895        # not in the Hub config: generate()'s mask_id
    eos_token_id: int = 156892         # not in the Hub config: generate()'s eos_id
    eot_token_id: int | None = None    # not in the Hub config; filled from the tokenizer
    block_size: int = _BLOCK           # not in the Hub config; written only when changed

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LLaDA2Config":
        refuse = {"hidden_act": ("silu",), "score_function": ("sigmoid",), "norm_head": (False,),
                  "use_sliding_window": (False,), "router_dtype": ("fp32",)}
        for key, ok in refuse.items():
            if key in d and d[key] is not None and d[key] not in ok:
                raise ValueError(f"{source}: LLaDA2 config has {key}={d[key]!r}; only {ok[0]!r} is supported")
        rs = d.get("rope_scaling")
        if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
            raise ValueError(f"{source}: LLaDA2 config has rope_scaling={rs!r}; only default RoPE is supported")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if isinstance(cfg.eos_token_id, list):
            cfg.eos_token_id = cfg.eos_token_id[0]
        if cfg.head_dim is None:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        if not self.num_key_value_heads:
            raise ValueError(f"{source}: LLaDA2 config has num_key_value_heads={self.num_key_value_heads!r}")
        dense = self.num_experts is None or self.first_k_dense_replace > 0
        if dense and not self.intermediate_size:
            raise ValueError(f"{source}: LLaDA2 config has dense layers but no intermediate_size")
        if self.num_experts is not None:
            if not self.moe_intermediate_size:
                raise ValueError(f"{source}: LLaDA2 config has num_experts but no moe_intermediate_size")
            if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"{source}: LLaDA2 config: num_experts={self.num_experts} must split into "
                                 f"n_group={self.n_group} groups and topk_group={self.topk_group} lie in "
                                 f"[1, n_group]")
            per_group = self.num_experts // self.n_group
            if per_group < 2 or self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(f"{source}: LLaDA2 config: num_experts_per_tok={self.num_experts_per_tok} "
                                 f"experts cannot come from topk_group={self.topk_group} groups of "
                                 f"{per_group} (the router scores a group by its two best experts)")

    def to_dict(self) -> dict:
        """The config.json a LLaDA2 checkpoint ships (real field names, real auto_map)."""
        d = asdict(self)
        d.pop("eot_token_id")
        if d["block_size"] == _BLOCK:
            d.pop("block_size")
        d.update({
            "architectures": ["LLaDA2MoeModelLM"],
            "model_type": "llada2_moe",
            "auto_map": {
                "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
            },
            "dtype": "bfloat16", "rotary_dim": self.rotary_dim(), "router_dtype": "fp32", "norm_topk_prob": True,
            "moe_router_enable_expert_bias": True, "attention_dropout": 0.0, "embedding_dropout": 0.0,
            "output_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False, "use_cache": False,
        })
        return d

    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe(self, layer: int) -> bool:
        return self.num_experts is not None and layer >= self.first_k_dense_replace

    def arch(self) -> Arch:
        return Arch(d_model=self.hidden_size, n_layers=self.num_hidden_layers,
                    n_heads=self.num_attention_heads, n_kv_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, mlp_hidden=self.intermediate_size or 0, vocab_size=self.vocab_size,
                    rope_theta=float(self.rope_theta), norm_eps=self.rms_norm_eps,
                    rope_full_precision=False, qkv_bias=self.use_qkv_bias, tied=self.tie_word_embeddings,
                    rotary_dim=self.rotary_dim())

    def spec(self) -> ModelSpec:
        eos = self.eos_token_id
        return ModelSpec(family="llada2", vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                         eos_token_id=eos, pad_token_id=eos if self.pad_token_id is None else self.pad_token_id,
                         eot_token_id=self.eot_token_id, max_length=self.max_position_embeddings,
                         shift_logits=False, block_size=self.block_size)


class LLaDA2Gate(nn.Module):
    """The router: hidden states (N, d) -> chosen experts (N, k) and their weights (N, k)."""

    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        c = self.c
        ct = torch.promote_types(h.dtype, torch.float32)
        scores = torch.sigmoid(F.linear(h.to(ct), self.weight.to(ct)))    # (N, E)
        biased = scores + self.expert_bias.to(ct)                          # choosing only
        N = h.shape[0]
        groups = biased.view(N, c.n_group, -1)                             # (N, G, E/G)
        group_score = groups.topk(2, dim=-1).values.sum(dim=-1)            # (N, G): two best per group
        kept = torch.zeros_like(group_score, dtype=torch.bool)
        kept.scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, True)
        allowed = kept.unsqueeze(-1).expand_as(groups).reshape(N, -1)      # (N, E)
        idx = biased.masked_fill(~allowed, float("-inf")).topk(c.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)                                          # unbiased scores (N, k)
        if c.num_experts_per_tok > 1:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling_factor


class LLaDA2SparseMoE(nn.Module):
    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        self.experts = nn.ModuleList(GatedMLP(c.hidden_size, c.moe_intermediate_size) for _ in range(c.num_experts))
        self.gate = LLaDA2Gate(c)
        if c.num_shared_experts:
            self.shared_experts = GatedMLP(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts)

    def forward(self, h: Tensor) -> Tensor:
        x = h.reshape(-1, h.shape[-1])                                     # (N, d)
        idx, w = self.gate(x)
        y = moe_combine(x, idx, w, self.experts).view_as(h)
        return y + self.shared_experts(h) if hasattr(self, "shared_experts") else y


class LLaDA2Attention(nn.Module):
    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.query_key_value = nn.Linear(c.hidden_size, (H + 2 * Hkv) * D, bias=c.use_qkv_bias)
        if c.use_qk_norm:
            self.query_layernorm = RMSNorm(D, c.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, c.rms_norm_eps)
        self.dense = nn.Linear(H * D, c.hidden_size, bias=c.use_bias)


class LLaDA2Layer(nn.Module):
    def __init__(self, c: LLaDA2Config, i: int) -> None:
        super().__init__()
        self.attention = LLaDA2Attention(c)
        self.mlp = LLaDA2SparseMoE(c) if c.is_moe(i) else GatedMLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def parts(self) -> BlockParts:
        at, m = self.attention, self.mlp
        dense = isinstance(m, GatedMLP)
        return BlockParts(self.input_layernorm, None, None, None, at.dense, self.post_attention_layernorm,
                          m.gate_proj if dense else None, m.up_proj if dense else None,
                          m.down_proj if dense else None, q_norm=getattr(at, "query_layernorm", None),
                          k_norm=getattr(at, "key_layernorm", None), qkv=at.query_key_value,
                          ffn=None if dense else m)


class LLaDA2Model(Denoiser):
    def __init__(self, config: LLaDA2Config) -> None:
        super().__init__()
        self.config = c = config
        self.arch = a = config.arch()
        self.spec = config.spec()
        self.model = nn.Module()
        self.model.word_embeddings = nn.Embedding(a.vocab_size, a.d_model)
        self.model.layers = nn.ModuleList(LLaDA2Layer(c, i) for i in range(a.n_layers))
        self.model.norm = RMSNorm(a.d_model, a.norm_eps)
        if not a.tied:
            self.lm_head = nn.Linear(a.d_model, a.vocab_size, bias=False)

    def embed_weight(self) -> Tensor:
        return self.model.word_embeddings.weight

    def head_weight(self) -> Tensor:
        return self.model.word_embeddings.weight if self.arch.tied else self.lm_head.weight

    def final_norm(self) -> RMSNorm:
        return self.model.norm

    def block_parts(self) -> list[BlockParts]:
        return [layer.parts() for layer in self.model.layers]

    def ffn_macs(self) -> list[float]:
        """Dense layers: the SwiGLU MLP; MoE layers: the router plus the chosen and shared experts."""
        c = self.config
        d = c.hidden_size
        moe = d * (c.num_experts or 0) + (c.num_experts_per_tok + (c.num_shared_experts or 0)) \
            * 3.0 * d * (c.moe_intermediate_size or 0)
        return [moe if c.is_moe(i) else 3.0 * d * c.intermediate_size for i in range(c.num_hidden_layers)]

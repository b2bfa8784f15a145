"""SDAR, Fast-dLLM v2 and LLaDA2 checkpoints in their real on-disk formats through load_model:
config.json keys as the Hub configs spell them (JetAstra/SDAR ``training/model/SDAR-8B-Chat/
config.json``, Efficient-Large-Model/Fast_dLLM_v2_7B ``config.json``, inclusionAI/LLaDA2.1-mini
``config.json``; sizes shrunk), safetensors under the checkpoints' parameter names."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dllm_decode.errors import CheckpointError
from dllm_decode.models import ComputePlan, build_random_model, load_model, save_pretrained
from reference_forward import hf_logits, hf_reference, llada2_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, D, HEADS, KV, HD, MLP = 64, 32, 4, 2, 8, 80

SDAR_CONFIG = {
    "architectures": ["SDARForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
    "bos_token_id": 61, "debug": False, "eos_token_id": 62, "block_size": 4, "mask_token_id": 63,
    "ep_size": 1, "fuse_cross_entropy": True, "head_dim": HD, "hidden_act": "silu", "hidden_size": D,
    "initializer_range": 0.02, "intermediate_size": MLP, "max_position_embeddings": 32768,
    "max_window_layers": 2, "micro_forward": False, "model_type": "sdar", "num_attention_heads": HEADS,
    "num_hidden_layers": 2, "num_key_value_heads": KV, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False,
    "use_sliding_window": False, "vocab_size": V,
}

FAST_DLLM_V2_CONFIG = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
                 "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
    "bd_size": 4, "bos_token_id": 61, "conplemenrary_mask": True, "eos_token_id": 62, "hidden_act": "silu",
    "hidden_size": D, "initializer_range": 0.02, "intermediate_size": MLP,
    "layer_types": ["full_attention", "full_attention"], "max_position_embeddings": 32768,
    "max_window_layers": 2, "model_type": "Fast_dLLM_Qwen", "num_attention_heads": HEADS, "num_hidden_layers": 2,
    "num_key_value_heads": KV, "pad_token_id": 62, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": V, "mask_token_id": 63,
}

LLADA2_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    "dtype": "bfloat16", "embedding_dropout": 0.0, "first_k_dense_replace": 1, "head_dim": HD, "hidden_act": "silu",
    "hidden_size": D, "initializer_range": 0.02, "intermediate_size": MLP, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "llada2_moe", "moe_intermediate_size": 16,
    "moe_router_enable_expert_bias": True, "n_group": 4, "norm_head": False, "norm_softmax": False,
    "norm_topk_prob": True, "num_attention_heads": HEADS, "num_experts": 8, "num_experts_per_tok": 2,
    "num_hidden_layers": 2, "num_key_value_heads": KV, "num_shared_experts": 1, "output_dropout": 0.0,
    "output_router_logits": False, "pad_token_id": 62, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 600000, "rotary_dim": HD // 2, "routed_scaling_factor": 2.5,
    "router_dtype": "fp32", "score_function": "sigmoid", "sliding_window": 4096, "tie_word_embeddings": False,
    "topk_group": 2, "transformers_version": "4.57.1", "use_bias": False, "use_cache": False, "use_qk_norm": True,
    "use_qkv_bias": False, "vocab_size": V, "mask_token_id": 63, "eos_token_id": 62,
}


def _qwen_names(n_layers, qk_norm, biases):
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
        names |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {f"{p}self_attn.{x}_proj.bias" for x in biases}
        if qk_norm:
            names |= {f"{p}self_attn.{x}_norm.weight" for x in "qk"}
    return names


def _llada2_names(n_layers, experts, dense_layers):
    names = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "attention.query_key_value.weight", "attention.query_layernorm.weight",
                                  "attention.key_layernorm.weight", "attention.dense.weight")}
        mlp = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        if i < dense_layers:
            names |= {f"{p}mlp.{n}" for n in mlp}
        else:
            names |= {f"{p}mlp.gate.weight", f"{p}mlp.gate.expert_bias"}
            names |= {f"{p}mlp.experts.{e}.{n}" for e in range(experts) for n in mlp}
            names |= {f"{p}mlp.shared_experts.{n}" for n in mlp}
    return names


NAMES = {"sdar": _qwen_names(2, qk_norm=True, biases=""), "fast_dllm_v2": _qwen_names(2, qk_norm=False, biases="qkv"),
         "llada2": _llada2_names(2, experts=8, dense_layers=1)}
CONFIGS = {"sdar": SDAR_CONFIG, "fast_dllm_v2": FAST_DLLM_V2_CONFIG, "llada2": LLADA2_CONFIG}
BLOCK_KEY = {"sdar": "block_size", "fast_dllm_v2": "bd_size", "llada2": "block_size"}


def _ids():
    g = torch.Generator().manual_seed(9)
    return torch.randint(0, 60, (2, 12), generator=g)


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2", "llada2"])
def test_round_trip_in_the_real_names(tmp_path, family):
    extra = {BLOCK_KEY[family]: 4, "eos_token_id": 62, "mask_token_id": 63}
    model = build_random_model(family, vocab_size=V, d_model=D, n_layers=2, n_heads=HEADS, n_kv_heads=KV,
                               mlp_hidden=MLP, seed=4, dtype=torch.float64, **extra)
    save_pretrained(model, tmp_path, shards=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    hub = CONFIGS[family]
    for key in ("architectures", "model_type", "auto_map"):
        assert cfg[key] == hub[key], key
    sizes = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                 intermediate_size=MLP, mask_token_id=63, eos_token_id=62, **{BLOCK_KEY[family]: 4})
    assert {k: cfg[k] for k in sizes} == sizes
    assert set(cfg) - set(hub) <= {"eos_token_id", "pad_token_id", "mask_token_id", "block_size", "use_sliding_window",
                                   "head_dim", "bos_token_id"}, "a config key the Hub configs do not have"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == NAMES[family]
    loaded, _ = load_model(tmp_path, dtype="float64")
    assert loaded.spec == model.spec and loaded.spec.block_size == 4
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def _write_hub_checkpoint(path, family, seed=3):
    """The tensors written by hand (not by save_pretrained) under the names a Hub download holds,
    with the Hub config.json; -> the float64 tensors as stored (bf16-rounded)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(NAMES[family]):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            shape = (HD,) if "_norm." in name or "attention.query_layernorm" in name \
                or "attention.key_layernorm" in name else (D,)
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("expert_bias") or name.endswith(".bias"):
            n = 8 if name.endswith("expert_bias") else (HEADS * HD if ".q_proj" in name else KV * HD)
            t = 0.1 * torch.randn(n, generator=g)
        else:
            t = torch.randn(_shape(name, family), generator=g) / D ** 0.5
        tensors[name] = t.to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIGS[family]))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return {k: v.to(torch.float64) for k, v in tensors.items()}


def _shape(name, family):
    moe = 16 if ".experts." in name or ".shared_experts." in name else MLP
    table = {"embed_tokens": (V, D), "word_embeddings": (V, D), "lm_head": (V, D), "q_proj": (HEADS * HD, D),
             "k_proj": (KV * HD, D), "v_proj": (KV * HD, D), "o_proj": (D, HEADS * HD),
             "query_key_value": ((HEADS + 2 * KV) * HD, D), "dense": (D, HEADS * HD), "gate.weight": (8, D),
             "gate_proj": (moe, D), "up_proj": (moe, D), "down_proj": (D, moe)}
    return next(v for k, v in table.items() if k in name)


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2", "llada2"])
def test_hub_layout_checkpoint_loads_and_matches_the_reference(tmp_path, family):
    sd = _write_hub_checkpoint(tmp_path, family)
    model, tok = load_model(tmp_path, dtype="float64")
    assert tok is None and model.spec.family == family
    block = 32 if family == "llada2" else 4          # LLaDA2: generate()'s block_length; the others: config
    assert (model.spec.mask_token_id, model.spec.eos_token_id, model.spec.pad_token_id, model.spec.block_size) == \
        (63, 62, 62, block)
    assert {k: v.to(torch.float64) for k, v in model.state_dict().items()}.keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    ids = _ids()
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        got = model(ids, plan=ComputePlan.full(block_size=4 if family == "llada2" else None).with_(shift=False))
    if family == "llada2":
        want = torch.stack([llada2_forward(sd, LLADA2_CONFIG, ids[b], mask[b], 4) for b in range(2)])
    else:
        want = hf_logits(hf_reference(model), ids, mask, 4)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-13


def test_official_defaults_fill_keys_the_hub_configs_leave_out(tmp_path):
    """LLaDA2 and Fast-dLLM v2 configs name no mask token (nor LLaDA2 an EOS): the official
    generation defaults apply (mask 156895 / EOS 156892; mask 151665), as does each family's
    default block (32)."""
    from dllm_decode.models import FastDLLMv2Config, LLaDA2Config
    c = {k: v for k, v in LLADA2_CONFIG.items() if k not in ("mask_token_id", "eos_token_id")}
    spec = LLaDA2Config.from_dict(c).spec()
    assert (spec.mask_token_id, spec.eos_token_id, spec.pad_token_id, spec.block_size) == (156895, 156892, 62, 32)
    c = {k: v for k, v in FAST_DLLM_V2_CONFIG.items() if k not in ("mask_token_id", "bd_size")}
    spec = FastDLLMv2Config.from_dict(c).spec()
    assert (spec.mask_token_id, spec.eos_token_id, spec.block_size, spec.shift_logits) == (151665, 62, 32, True)


def _write_tokenizer(path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", mask_token="<|MASK|>")
    tok.save_pretrained(str(path))


def test_sdar_ids_from_the_tokenizer(tmp_path):
    """SDAR's generate.py takes the mask id from the tokenizer's mask token when none is given,
    and its config has no pad_token_id: both come from the tokenizer; without either source the
    load is refused naming the key."""
    _write_hub_checkpoint(tmp_path, "sdar")
    cfg = {k: v for k, v in SDAR_CONFIG.items() if k != "mask_token_id"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'mask_token_id' is missing") as err:
        load_model(tmp_path)
    assert "config.json" in str(err.value)
    _write_tokenizer(tmp_path, ["<unk>", "hello", "<|endoftext|>", "<|im_end|>", "<|MASK|>"])
    model, tok = load_model(tmp_path)
    assert (model.spec.mask_token_id, model.spec.pad_token_id, model.spec.eos_token_id, model.spec.eot_token_id) \
        == (4, 2, 62, 3)


@pytest.mark.parametrize("family,key,value", [
    ("sdar", "use_sliding_window", True),
    ("sdar", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("fast_dllm_v2", "layer_types", ["full_attention", "sliding_attention"]),
    ("llada2", "score_function", "softmax"),
    ("llada2", "norm_head", True),
    ("llada2", "n_group", 3),
    ("llada2", "num_key_value_heads", 0),
])
def test_unsupported_config_values_are_refused(tmp_path, family, key, value):
    _write_hub_checkpoint(tmp_path, family)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS[family], key: value}))
    with pytest.raises(CheckpointError, match=key) as err:
        load_model(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "sdar_moe", "architectures": ["SDARMoeForCausalLM"]}, "SDARMoeForCausalLM"),
    ({"model_type": "qwen3"}, "'model_type' is 'qwen3'"),
])
def test_unknown_block_families_refused(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=needle) as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "LLaDA2MoeModelLM" in str(err.value)

"""Checkpoints in the real LLaDA / Dream on-disk formats through load_model (the block-diffusion
families: test_models_block_loader.py)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dllm_decode.models import (ComputePlan, build_random_model, encode_prompts, load_model,
                                save_pretrained)

D, LAYERS, HEADS, MLP, V = 32, 2, 4, 80, 64

# the LLaDA-8B config.json, sizes shrunk (OLMo field names as on the Hub)
LLADA_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "d_model": D, "embedding_dropout": 0.0, "embedding_size": V, "eos_token_id": 62,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 63, "max_sequence_length": 4096, "mlp_hidden_size": MLP, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "n_heads": HEADS, "n_kv_heads": HEADS,
    "n_layers": LAYERS, "pad_token_id": 62, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": V, "weight_tying": False,
}

# the Dream-v0-7B config.json, sizes shrunk (Qwen2 field names)
DREAM_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 62, "eos_token_id": 62, "hidden_act": "silu", "hidden_size": D,
    "initializer_range": 0.02, "intermediate_size": MLP, "mask_token_id": 63,
    "max_position_embeddings": 131072, "max_window_layers": LAYERS, "model_type": "Dream",
    "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": 2,
    "pad_token_id": 62, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
    "vocab_size": V,
}


def _llada_tensors(g, kv=HEADS):
    hd = D // HEADS
    t = {"model.transformer.wte.weight": torch.randn(V, D, generator=g),
         "model.transformer.ln_f.weight": 1 + 0.1 * torch.randn(D, generator=g),
         "model.transformer.ff_out.weight": torch.randn(V, D, generator=g) / D ** 0.5}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        shapes = {"attn_norm.weight": (D,), "q_proj.weight": (D, D), "k_proj.weight": (kv * hd, D),
                  "v_proj.weight": (kv * hd, D), "attn_out.weight": (D, D), "ff_norm.weight": (D,),
                  "ff_proj.weight": (MLP, D), "up_proj.weight": (MLP, D), "ff_out.weight": (D, MLP)}
        for n, shp in shapes.items():
            t[p + n] = (1 + 0.1 * torch.randn(shp, generator=g)) if len(shp) == 1 else \
                torch.randn(shp, generator=g) / shp[1] ** 0.5
    return t


def _dream_tensors(g, kv=2):
    hd = D // HEADS
    t = {"model.embed_tokens.weight": torch.randn(V, D, generator=g),
         "model.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
         "lm_head.weight": torch.randn(V, D, generator=g) / D ** 0.5}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm.weight": (D,), "self_attn.q_proj.weight": (D, D),
                  "self_attn.q_proj.bias": (D, 1), "self_attn.k_proj.weight": (kv * hd, D),
                  "self_attn.k_proj.bias": (kv * hd, 1), "self_attn.v_proj.weight": (kv * hd, D),
                  "self_attn.v_proj.bias": (kv * hd, 1), "self_attn.o_proj.weight": (D, D),
                  "post_attention_layernorm.weight": (D,), "mlp.gate_proj.weight": (MLP, D),
                  "mlp.up_proj.weight": (MLP, D), "mlp.down_proj.weight": (D, MLP)}
        for n, shp in shapes.items():
            if len(shp) == 1:
                t[p + n] = 1 + 0.1 * torch.randn(shp, generator=g)
            elif shp[1] == 1:
                t[p + n] = 0.1 * torch.randn(shp[0], generator=g)
            else:
                t[p + n] = torch.randn(shp, generator=g) / shp[1] ** 0.5
    return t


def _write_sharded(path, tensors, config, n_shards):
    """What a Hub download looks like: config.json, model-0000k-of-0000n.safetensors, index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    weight_map = {}
    for j in range(n_shards):
        fname = f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n].to(torch.bfloat16).contiguous() for n in names[j::n_shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * 2 for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def _ids(pads=(0, 3)):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 60, (len(pads), 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for b, n in enumerate(pads):
        mask[b, :n] = False
    return ids, mask


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_hub_layout_checkpoint_matches_eurobert(lib, tmp_path, family):
    """A checkpoint written by hand in the real format (not by our writer) loads through
    load_model and matches EuroBERT fed the same tensors."""
    g = torch.Generator().manual_seed(3)
    if family == "llada":
        tensors, cfg, kv, eps, theta = _llada_tensors(g), LLADA_CONFIG, HEADS, 1e-5, 500000.0
        _write_sharded(tmp_path, tensors, cfg, n_shards=2)
    else:
        tensors, cfg, kv, eps, theta = _dream_tensors(g), DREAM_CONFIG, 2, 1e-6, 1e6
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    model, tok = load_model(tmp_path, dtype="float64")
    assert tok is None and model.spec.family == family
    assert model.spec.mask_token_id == 63 and model.spec.eos_token_id == 62
    assert all(p.device.type == "cpu" and p.dtype == torch.float64 for p in model.parameters())
    sd = {k: v.to(torch.bfloat16).to(torch.float64) for k, v in tensors.items()}
    ref = lib.eurobert_from_state(family, sd, vocab=V, d=D, layers=LAYERS, heads=HEADS,
                                  kv_heads=kv, mlp=MLP, eps=eps, theta=theta)
    ids, mask = _ids()
    with torch.no_grad():
        got = model(ids, mask, plan=ComputePlan.full().with_(shift=False))
    assert lib.rel_err(got[mask], lib.eurobert_logits(ref, ids, mask)[mask]) < 1e-6


def test_llada_sharded_round_trip(tmp_path):
    model = build_random_model("llada", vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                               mlp_hidden=MLP, mask_token_id=63, eos_token_id=62, seed=4)
    save_pretrained(model, tmp_path, shards=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, want in {"d_model": D, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": HEADS,
                      "mlp_hidden_size": MLP, "vocab_size": V, "embedding_size": V,
                      "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "mask_token_id": 63,
                      "eos_token_id": 62, "pad_token_id": 62, "weight_tying": False,
                      "block_type": "llama", "model_type": "llada",
                      "architectures": ["LLaDAModelLM"]}.items():
        assert cfg[key] == want, key
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{j}-of-00003.safetensors" for j in (1, 2, 3)]
    assert set(index["weight_map"]) == set(_llada_tensors(torch.Generator().manual_seed(0)))
    loaded, _ = load_model(tmp_path, dtype="float32")
    ids, mask = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_dream_round_trip_and_size_sharding(tmp_path):
    model = build_random_model("dream", vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=HEADS,
                               n_kv_heads=2, mlp_hidden=MLP, mask_token_id=63, eos_token_id=62, seed=5)
    save_pretrained(model, tmp_path / "one")
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    assert cfg["hidden_size"] == D and cfg["num_key_value_heads"] == 2 and cfg["mask_token_id"] == 63
    from safetensors import safe_open
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(_dream_tensors(torch.Generator().manual_seed(0)))
    save_pretrained(model, tmp_path / "many", max_shard_size=20_000)
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 2
    ids, mask = _ids()
    with torch.no_grad():
        want = model(ids, mask)
        for sub in ("one", "many"):
            loaded, _ = load_model(tmp_path / sub)
            assert torch.equal(loaded(ids, mask), want)
        bf16, _ = load_model(tmp_path / "one", dtype="bfloat16")
        assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16(ids, mask)).all()


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "bert"),
    ({"model_type": "llada", "architectures": ["LLaDAMoEModelLM"]}, "LLaDAMoEModelLM"),
    ({"model_type": "bd3lm", "architectures": ["BD3LM"]}, "bd3lm"),
])
def test_unknown_family_refused(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=needle) as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unsupported_llada_variant_and_broken_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = _llada_tensors(g)
    bad = tmp_path / "bad"
    _write_sharded(bad, tensors, {**LLADA_CONFIG, "block_type": "sequential"}, 1)
    with pytest.raises(ValueError, match="block_type"):
        load_model(bad)
    missing = tmp_path / "missing"
    _write_sharded(missing, {k: v for k, v in tensors.items() if "blocks.1.up_proj" not in k},
                   LLADA_CONFIG, 2)
    with pytest.raises(ValueError, match="blocks.1.up_proj"):
        load_model(missing)
    extra = tmp_path / "extra"
    _write_sharded(extra, {**tensors, "model.transformer.blocks.0.q_norm.weight": torch.ones(D)},
                   LLADA_CONFIG, 2)
    with pytest.raises(ValueError, match="q_norm"):
        load_model(extra)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype"):
        load_model(missing, dtype="int8")


def test_real_llada_vocabulary_and_special_ids(tmp_path):
    """Full LLaDA vocabulary at a tiny width: the real special ids survive the round trip."""
    model = build_random_model("llada", vocab_size=126464, d_model=16, n_layers=1, n_heads=2,
                               mlp_hidden=32, mask_token_id=126336, eos_token_id=126081,
                               dtype=torch.bfloat16)
    save_pretrained(model, tmp_path)
    loaded, _ = load_model(tmp_path, dtype="bfloat16")
    s = loaded.spec
    assert (s.vocab_size, s.mask_token_id, s.eos_token_id, s.pad_token_id, s.shift_logits) == \
        (126464, 126336, 126081, 126081, False)
    ids = torch.tensor([[1, 2, 3, 126336, 126336]])
    out = loaded(ids, plan=ComputePlan.full(out_start=3))
    assert out.shape == (1, 2, 126464)


def _write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "user", "assistant",
             "hello", "world", "how", "are", "you"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|startoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = ("<|startoftext|> {% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                         "<|eot_id|> {% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    tok.save_pretrained(str(path))


def test_tokenizer_and_chat_template(tmp_path):
    model = build_random_model("llada", vocab_size=V, d_model=D, n_layers=1, n_heads=HEADS)
    save_pretrained(model, tmp_path)
    _write_tokenizer(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert tok is not None
    assert loaded.spec.eot_token_id == 3      # resolved from <|eot_id|>
    ids, mask = encode_prompts(tok, ["hello world", "how are you hello"], chat=True,
                               pad_token_id=loaded.spec.pad_token_id)
    pad = loaded.spec.pad_token_id
    assert ids[1].tolist() == [1, 4, 8, 9, 10, 6, 3, 5]      # template tokens, generation prompt
    assert ids[0].tolist() == [pad, pad, 1, 4, 6, 7, 3, 5]   # left padded
    assert mask[0].tolist() == [False, False] + [True] * 6 and bool(mask[1].all())
    plain, _ = encode_prompts(tok, ["hello world"], pad_token_id=0)
    assert 5 not in plain[0].tolist()        # no template without chat=True


def test_dream_remote_code_tokenizer_falls_back_to_qwen2_bpe(tmp_path):
    """Dream's Hub tokenizer_config names a remote-code DreamTokenizer over Qwen2's BPE files;
    we load the BPE without remote code (and without transformers' interactive prompt)."""
    model = build_random_model("dream", vocab_size=V, d_model=D, n_layers=1, n_heads=HEADS)
    save_pretrained(model, tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(
        {"h": 0, "e": 1, "l": 2, "o": 3, "he": 4, "ll": 5, "hell": 6, "hello": 7}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\n")
    special = {str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False}
               for i, c in ((8, "<|endoftext|>"), (9, "<|im_end|>"), (10, "<|mask|>"))}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "tokenizer_class": "DreamTokenizer", "added_tokens_decoder": special,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"}))
    loaded, tok = load_model(tmp_path)
    assert tok("hello")["input_ids"] == [7]
    assert loaded.spec.eot_token_id == 9

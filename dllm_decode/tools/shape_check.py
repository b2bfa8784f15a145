"""Per-step latency of a full forward vs Fast-dLLM cached block steps and a dLLM-Cache step
(response reused, V-verify recomputing a quarter of it, layer 0 in full), on a model of real
shape with random weights (timing does not depend on the weights).

    python -m dllm_decode.tools.shape_check                       # LLaDA-8B shape
    python -m dllm_decode.tools.shape_check --layers 2 --d-model 256 --heads 4 --vocab 4096

The default shape needs ~16 GB (bf16) on the device; when the device lacks the memory the
script says so and exits instead of faking a run (use the overrides on small machines).

Block-diffusion checkpoints (``--preset``): a model built from the real config.json values of
LLaDA2-mini, SDAR-8B-Chat or Fast-dLLM-v2-7B (``--layers`` keeps fewer layers; ``--set KEY=VALUE``
changes any other config key), written with random weights as a checkpoint in the real parameter
names and config keys, loaded back through ``load_model``, and run as the official loops run it:
a prefill of the prompt's whole blocks, then one block step against the cached K/V, checked
against the same rows of a forward over the whole canvas.

    python -m dllm_decode.tools.shape_check --preset llada2-mini --layers 2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dllm_decode.models.dream import DreamConfig, DreamModel
from dllm_decode.models.llada import LLaDAConfig, LLaDAModel
from dllm_decode.models.loader import _FAMILIES, detect_family, load_model, resolve_dtype, save_pretrained
from dllm_decode.models.plan import ComputePlan
from dllm_decode.models.store import CacheStore


# The checkpoints' config.json values. SDAR-8B-Chat: JetAstra/SDAR training/model/SDAR-8B-Chat/
# config.json. Fast-dLLM-v2-7B: Efficient-Large-Model/Fast_dLLM_v2_7B config.json (architectures to
# pad_token_id as the Hub shows them); rms_norm_eps, rope_theta, sliding_window, tie_word_embeddings
# and vocab_size as in its base model's, Qwen/Qwen2.5-7B-Instruct config.json. LLaDA2-mini:
# inclusionAI/LLaDA2.1-mini config.json (LLaDA2.0-mini's architecture: 20 layers, hidden 2048,
# 256 experts, vocabulary 157184).
PRESETS: dict[str, dict] = {
    "sdar-8b": {
        "architectures": ["SDARForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151643, "block_size": 4, "mask_token_id": 151669, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 32768, "max_window_layers": 36,
        "model_type": "sdar", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
    },
    "fast-dllm-v2-7b": {
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "bd_size": 32, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
        "layer_types": ["full_attention"] * 28, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "Fast_dLLM_Qwen", "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "pad_token_id": 151645, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064,
    },
    "llada2-mini": {
        "architectures": ["LLaDA2MoeModelLM"], "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 5120, "max_position_embeddings": 32768, "model_type": "llada2_moe",
        "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True, "n_group": 8, "norm_head": False,
        "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8,
        "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1, "pad_token_id": 156892,
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 600000,
        "rotary_dim": 64, "routed_scaling_factor": 2.5, "router_dtype": "fp32", "score_function": "sigmoid",
        "tie_word_embeddings": False, "topk_group": 4, "use_bias": False, "use_qk_norm": True,
        "use_qkv_bias": False, "vocab_size": 157184,
    },
}


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: let the run try


def _build(args, dtype: torch.dtype, device: torch.device):
    d, heads = args.d_model, args.heads
    kv = args.kv_heads or heads
    mlp = args.mlp_hidden or 3 * d   # LLaDA-8B: 12288 = 3 * 4096
    if args.family == "llada":
        cfg = LLaDAConfig(d_model=d, n_layers=args.layers, n_heads=heads, n_kv_heads=kv,
                          mlp_hidden_size=mlp, vocab_size=args.vocab, embedding_size=args.vocab,
                          mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2,
                          pad_token_id=args.vocab - 2)
        cls = LLaDAModel
    else:
        cfg = DreamConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=mlp,
                          num_hidden_layers=args.layers, num_attention_heads=heads,
                          num_key_value_heads=kv, mask_token_id=args.vocab - 1,
                          eos_token_id=args.vocab - 2, pad_token_id=args.vocab - 2)
        cls = DreamModel
    with torch.device("meta"):
        model = cls(cfg).to(dtype)        # no memory yet: sizes only
    n_params = model.num_parameters()
    need = n_params * torch.finfo(dtype).bits // 8
    return model, n_params, need


@torch.inference_mode()
def _time(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeats


def _preset_config(args) -> tuple[str, dict]:
    """The preset's config.json with --layers and --set applied -> (family, config dict)."""
    cfg = dict(PRESETS[args.preset])
    for item in args.set or ():
        key, _, value = item.partition("=")
        cfg[key] = json.loads(value)
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
        if "layer_types" in cfg:
            cfg["layer_types"] = ["full_attention"] * args.layers
    return detect_family(cfg, f"preset {args.preset}"), cfg


def _random_(model, seed: int, device: torch.device) -> None:
    """Fast random weights for a model of real size: N(0, 0.02) matrices, unit norm weights,
    zero biases and router expert biases."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dim() > 1:
                t.normal_(0.0, 0.02, generator=g)
            else:
                t.fill_(1.0 if "norm" in name else 0.0)


def _run_preset(args, dtype: torch.dtype, device: torch.device) -> int:
    family, cfg_dict = _preset_config(args)
    cfg_cls, model_cls = _FAMILIES[family]
    cfg = cfg_cls.from_dict(cfg_dict, f"preset {args.preset}")
    with torch.device("meta"):
        model = model_cls(cfg).to(dtype)
    n_params = model.num_parameters()
    need = 2 * n_params * torch.finfo(dtype).bits // 8                  # the model, then its reload
    a, spec = model.arch, model.spec
    if max(spec.mask_token_id, spec.eos_token_id, spec.pad_token_id) >= spec.vocab_size:
        print(f"# preset {args.preset}: mask / EOS / pad ids {spec.mask_token_id} / {spec.eos_token_id} / "
              f"{spec.pad_token_id} lie outside vocab_size {spec.vocab_size}; --set mask_token_id, eos_token_id "
              "and pad_token_id with a smaller vocab_size", file=sys.stderr)
        return 2
    print(f"# shape_check  preset={args.preset} family={family} layers={a.n_layers}/"
          f"{PRESETS[args.preset]['num_hidden_layers']} d_model={a.d_model} heads={a.n_heads}/{a.n_kv_heads}x"
          f"{a.head_dim} vocab={a.vocab_size} block={spec.block_size} params={n_params / 1e9:.3f}B "
          f"dtype={str(dtype).removeprefix('torch.')} device={device}")
    if need > 0.9 * _available_bytes(device):
        print(f"# not enough memory on {device} for {need / 2**30:.1f} GiB of weights (the model and its "
              "reload); rerun with a smaller --layers or --set", file=sys.stderr)
        return 2
    model = model.to_empty(device=device).eval().requires_grad_(False)
    _random_(model, args.seed, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint or tmp)
        t0 = time.perf_counter()
        save_pretrained(model, path, max_shard_size=4 << 30)
        t1 = time.perf_counter()
        del model
        loaded, _ = load_model(path, dtype=dtype, device=device)
        t2 = time.perf_counter()
        files = sorted(p.name for p in path.glob("*.safetensors"))
        print(f"# checkpoint: {len(files)} safetensors file(s) in the real names, written in {t1 - t0:.1f} s, "
              f"loaded through load_model in {t2 - t1:.1f} s")
        return _cached_block(loaded, args, device)


def _cached_block(model, args, device: torch.device) -> int:
    """Prefill the prompt's whole blocks, then one block step against the cache; compare it with
    the same rows of a forward over the whole canvas."""
    spec, bs = model.spec, model.spec.block_size
    P = args.prompt
    s = P // bs * bs                                     # the block holding the prompt's end
    L = s + 2 * bs
    g = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(0, spec.vocab_size - 2, (args.batch, L), device=device, generator=g)
    ids[:, P:] = spec.mask_token_id
    store = CacheStore()
    with torch.inference_mode():
        t0 = time.perf_counter()
        if s:
            model(ids, plan=ComputePlan.refresh(end=s), store=store)
        t1 = time.perf_counter()
        step = _time(lambda: model(ids, plan=ComputePlan.block_step(s, s + bs).with_(shift=False), store=store),
                     args.repeats, args.warmup, device)
        got = model(ids, plan=ComputePlan.block_step(s, s + bs).with_(shift=False), store=store)
        want = model(ids, plan=ComputePlan.full().with_(shift=False))[:, s:s + bs]
    same = bool(torch.equal(got, want))
    finite = bool(torch.isfinite(got).all())
    print(f"{'prompt':>7} {'block':>6} {'prefill_ms':>11} {'step_ms':>9} {'finite':>7} {'same_as_full':>13}")
    print(f"{P:>7} {s:>3}:{s + bs:<3} {(t1 - t0) * 1e3:>10.2f} {step * 1e3:>9.2f} {str(finite):>7} {str(same):>13}")
    return 0 if same and finite else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dllm_decode.tools.shape_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a block-diffusion checkpoint's real config: write, reload and run one cached block")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="--preset: override a config.json key (JSON value), e.g. hidden_size=64")
    ap.add_argument("--checkpoint", default=None, help="--preset: write the checkpoint here (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=None, help="default 32 (LLaDA-8B); --preset: the config's")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--mlp-hidden", type=int, default=None, help="default 3 x d-model (LLaDA-8B)")
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--prompt", type=int, default=128, help="prompt length")
    ap.add_argument("--gen", type=int, nargs="+", default=[256, 1024], help="generation lengths")
    ap.add_argument("--block", type=int, default=32, help="block length of the cached step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.preset:
        return _run_preset(args, dtype, device)
    if args.layers is None:
        args.layers = 32
    model, n_params, need = _build(args, dtype, device)
    a = model.arch
    L_max = args.prompt + max(args.gen)
    # K/V store of the cached steps, per layer (B, Hkv, L, D) x 2, plus dLLM-Cache's attention
    # and FFN outputs (B, L, d) x 2
    elem = torch.finfo(dtype).bits // 8
    store_bytes = 2 * a.n_layers * args.batch * L_max * (a.n_kv_heads * a.head_dim + a.d_model) * elem
    avail = _available_bytes(device)
    print(f"# shape_check  family={args.family} layers={a.n_layers} d_model={a.d_model} "
          f"heads={a.n_heads}/{a.n_kv_heads} mlp={a.mlp_hidden} vocab={a.vocab_size} "
          f"params={n_params / 1e9:.3f}B dtype={str(dtype).removeprefix('torch.')} device={device}")
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}")
    else:
        print(f"# device: cpu ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads)")
    if need + store_bytes > 0.9 * avail:
        print(f"# not enough memory on {device}: weights {need / 2**30:.1f} GiB + cache "
              f"{store_bytes / 2**30:.1f} GiB > 90% of {avail / 2**30:.1f} GiB available; "
              "rerun with smaller --layers/--d-model/--vocab", file=sys.stderr)
        return 2

    model = model.to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)

    print(f"{'gen':>6} {'L':>6} {'full_ms':>10} {'prefix_ms':>10} {'dual_ms':>10} {'dllm_ms':>10} "
          f"{'full/dual':>10} {'full/dllm':>10}")
    for G in args.gen:
        L = args.prompt + G
        ids = torch.randint(0, a.vocab_size - 2, (args.batch, L), device=device, generator=g)
        ids[:, args.prompt:] = model.spec.mask_token_id
        s, e = args.prompt, args.prompt + min(args.block, G)
        store = CacheStore()
        with torch.inference_mode():
            model(ids, plan=ComputePlan.refresh(features=True), store=store)
        full = _time(lambda: model(ids), args.repeats, args.warmup, device)
        prefix = _time(lambda: model(ids, plan=ComputePlan.prefix_step(s), store=store),
                       args.repeats, args.warmup, device)
        dual = _time(lambda: model(ids, plan=ComputePlan.dual_step(s, e), store=store),
                     args.repeats, args.warmup, device)
        feature = ComputePlan.feature_step(s, rho=0.25, full_layers=(0,))
        dllm = _time(lambda: model(ids, plan=feature, store=store), args.repeats, args.warmup, device)
        print(f"{G:>6} {L:>6} {full * 1e3:>10.2f} {prefix * 1e3:>10.2f} {dual * 1e3:>10.2f} "
              f"{dllm * 1e3:>10.2f} {full / dual:>10.2f} {full / dllm:>10.2f}")
        del store
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

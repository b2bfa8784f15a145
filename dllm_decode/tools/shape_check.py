"""Per-step latency of a full forward vs Fast-dLLM cached block steps and a dLLM-Cache step
(response reused, V-verify recomputing a quarter of it, layer 0 in full), on a model of real
shape with random weights (timing does not depend on the weights).

    python -m dllm_decode.tools.shape_check                       # LLaDA-8B shape
    python -m dllm_decode.tools.shape_check --layers 2 --d-model 256 --heads 4 --vocab 4096

The default shape needs ~16 GB (bf16) on the device; when the device lacks the memory the
script says so and exits instead of faking a run (use the overrides on small machines).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from dllm_decode.models.dream import DreamConfig, DreamModel
from dllm_decode.models.llada import LLaDAConfig, LLaDAModel
from dllm_decode.models.loader import resolve_dtype
from dllm_decode.models.plan import ComputePlan
from dllm_decode.models.store import CacheStore


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dllm_decode.tools.shape_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--layers", type=int, default=32)
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

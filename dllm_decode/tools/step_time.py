"""Time one training step (forward, backward, clipping, AdamW) of candidate model sizes, to size a
training run to a time budget.

    python -m dllm_decode.tools.step_time --family ar --sizes 384x6x1024,256x12x704 \
        --lengths 256,1024 --tokens 8192 --autocast none,bf16 --repeats 3
    python -m dllm_decode.tools.step_time --family dream --sizes 512x4x1408 --lengths 1280 \
        --tokens 65536 --autocast bf16 --compile eager,compile --device cuda

A size is ``D_MODELxN_LAYERSxMLP_HIDDEN`` (heads: d_model / 64). Each row is a batch of
``tokens // length`` random sequences of `length` tokens through the very model, loss and
optimizer step ``train`` uses (with ``--mask-mix``, ``--loss-weight``, ``--attention-anneal`` and
``--repr-align`` as ``train`` takes them: annealing's mask and REPR-ALIGN's teacher cost time too);
the step is timed `repeats` times after one warm-up and the minimum is reported,
since other processes sharing the CPU only ever make a step slower. ``--compile eager,compile``
times each setting without and with ``torch.compile`` (``train --compile``; the compiled warm-up
step includes the compilation and is not counted). On a CUDA device the step is timed to the
end of its kernels. The process's CPU seconds per
step, divided by the thread count, are reported beside it: what the wall time would be with the
cores to itself, less swayed by other load than the wall clock (waiting threads that spin still
count, so it too can only overstate).
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass

import torch

from dllm_decode.tools.char_tokenizer import build_char_tokenizer
from dllm_decode.tools.train import (FAMILIES, TrainConfig, apply_gradients, batch_loss, build, check_config,
                                     compiled, optimizer, parse_floats)


@dataclass
class Timing:
    size: str
    non_embedding: int      # parameters outside the embedding and the LM head
    family: str
    length: int
    batch: int
    autocast: str
    compile: str            # eager | compile
    seconds: float          # minimum over the repeats
    cpu_seconds: float      # minimum CPU seconds per step / threads

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.length / self.seconds


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        d, n, m = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes {text!r}: expected D_MODELxN_LAYERSxMLP_HIDDEN, e.g. 384x6x1024") from None
    if d % 64:
        raise SystemExit(f"--sizes {text!r}: d_model must be a multiple of 64 (heads of 64)")
    return d, n, m


def non_embedding_parameters(model: torch.nn.Module, vocab: int) -> int:
    return sum(p.numel() for p in model.parameters() if vocab not in p.shape)


def time_step(cfg: TrainConfig, length: int, tokens: int, repeats: int) -> tuple[int, float, float, int]:
    """-> (batch rows, minimum wall seconds per step, minimum CPU seconds per step / threads,
    non-embedding parameters). The step is ``train``'s own (``batch_loss``, ``apply_gradients``), so
    the settings that add work (``--attention-anneal``'s mask, ``--repr-align``'s teacher, whose
    weights here are a frozen copy of the student's) are in its time."""
    check_config(cfg)
    tok = build_char_tokenizer()
    model = build(cfg, tok)
    step_model = compiled(model) if cfg.compile else model
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.repr_align else None
    opt = optimizer(cfg, model)
    B = max(1, tokens // length)
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    ids = torch.randint(10, len(tok) - 5, (B, length), generator=g).to(cfg.device)   # (B, L) characters
    att = torch.ones(B, length, dtype=torch.bool, device=cfg.device)
    P = 32                                                                # a prompt; the rest is answer
    best = best_cpu = float("inf")
    for i in range(repeats + 1):
        t, c = time.perf_counter(), time.process_time()
        # schedule step 0: an annealed run's mask is on (any share of it costs the same)
        apply_gradients(cfg, model, opt, batch_loss(cfg, step_model, tok, ids, att, P, 0, g, rng, teacher))
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.synchronize(cfg.device)
        if i:                                                             # the first is a warm-up
            best = min(best, time.perf_counter() - t)
            best_cpu = min(best_cpu, (time.process_time() - c) / torch.get_num_threads())
    return B, best, best_cpu, non_embedding_parameters(model, len(tok))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Time a training step of candidate model sizes.")
    ap.add_argument("--family", choices=FAMILIES, default="ar")
    ap.add_argument("--sizes", required=True, help="comma-separated D_MODELxN_LAYERSxMLP_HIDDEN")
    ap.add_argument("--lengths", default="256,1024", help="sequence lengths (prompt + answer / canvas)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (rows = tokens // length)")
    ap.add_argument("--autocast", default="none,bf16", help="comma-separated: none, bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", default="eager", help="comma-separated: eager, compile (torch.compile)")
    ap.add_argument("--device", default="cpu")
    defaults = TrainConfig()
    ap.add_argument("--block-size", type=int, default=defaults.block_size, help="sdar, fast_dllm_v2: the block size")
    ap.add_argument("--mask-mix", default=",".join(str(x) for x in defaults.mask_mix),
                    help="llada/dream: iid / block / eos row odds (as train's)")
    ap.add_argument("--loss-weight", choices=("mdlm", "cart"), default=defaults.loss_weight)
    ap.add_argument("--attention-anneal", type=int, default=0, metavar="N",
                    help="llada/dream: time the step with train's annealing mask on (N >= 2)")
    ap.add_argument("--repr-align", type=float, default=0.0, metavar="W",
                    help="dream: time the step with REPR-ALIGN's teacher forward and term")
    a = ap.parse_args(argv)
    modes = a.compile.split(",")
    if not set(modes) <= {"eager", "compile"}:
        raise SystemExit(f"--compile {a.compile!r}: expected eager and/or compile, comma-separated")
    mix = parse_floats(a.mask_mix, "--mask-mix")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.tokens} tokens per step, "
          f"minimum of {a.repeats}")
    print("| size | non-embedding params | family | length | batch | autocast | compile | s/step "
          "| CPU s/step / threads | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in a.sizes.split(","):
        d, n, m = parse_size(size)
        for length in (int(x) for x in a.lengths.split(",")):
            for ac in a.autocast.split(","):
                for mode in modes:
                    cfg = TrainConfig(family=a.family, out="unused", d_model=d, n_layers=n, n_heads=d // 64,
                                      mlp_hidden=m, max_length=max(1024, length), autocast=ac,
                                      threads=a.threads, device=a.device, compile=mode == "compile",
                                      block_size=a.block_size, mask_mix=mix, loss_weight=a.loss_weight,
                                      attention_anneal=a.attention_anneal, repr_align=a.repr_align)
                    try:
                        B, s, cpu, ne = time_step(cfg, length, a.tokens, a.repeats)
                    except ValueError as e:             # check_config's refusals name the flag
                        raise SystemExit(f"step_time: {e}") from None
                    t = Timing(size, ne, a.family, length, B, ac, mode, s, cpu)
                    print(f"| {size} | {ne / 1e6:.1f}M | {a.family} | {length} | {B} | {ac} | {mode} | {s:.3f} "
                          f"| {cpu:.2f} | {t.tokens_per_second:.0f} |", flush=True)


if __name__ == "__main__":
    main()

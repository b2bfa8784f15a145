"""Train the reference models on the task suite.

    python -m dllm_decode.tools.train --family llada --out models/llada-reference
    python -m dllm_decode.tools.train --family dream --out models/dream-reference
    python -m dllm_decode.tools.train --family ar    --out models/ar-reference

``llada`` / ``dream``: LLaDA's supervised masked-diffusion objective. Each row draws a mask
ratio t ~ U(eps, 1) (stratified over the batch so every batch spans the range), masks each
answer token with probability t (the prompt never), and scores cross-entropy on the masked
positions weighted 1/t, normalised by the canvas length. The answer is padded with EOS to the
canvas length and the EOS tokens are targets, as in LLaDA's SFT, so the model learns to fill a
generation canvas that is longer than its answer. The canvas length varies per batch so the
model sees every length it will be decoded at.

``ar``: a standard ``LlamaForCausalLM`` trained by next-token prediction on the answer and one
EOS (prompt tokens are not targets); it is APD's verifier and the autoregressive baseline.

Training is deterministic for a given seed and thread count: problems come from the seeded
``train`` split, batches from a seeded generator, and the step count is fixed (no wall-clock
schedule), so a rerun reproduces the checkpoint.

``--init DIR`` starts a second stage from a checkpoint this script wrote (same family and size)
with its own schedule, seed and masking; the new ``training.json`` keeps the first stage's
record and loss log, so the model card can show both commands and ``--check`` can compare a
rerun of either stage with the shipped logs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_decode.tools.char_tokenizer import save_char_tokenizer
from dllm_decode.measure.tasks import REFERENCE_MIX, get_task


@dataclass
class TrainConfig:
    family: str = "llada"             # llada | dream | ar
    out: str = "models/llada-reference"
    tasks: tuple[str, ...] = REFERENCE_MIX
    task_weights: tuple[float, ...] = ()   # sampling odds of `tasks`; () draws them with equal odds
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 384
    canvas: tuple[int, ...] = (96, 128, 256)   # generation lengths sampled per batch
    canvas_weights: tuple[float, ...] = (6.0, 2.5, 1.5)
    eps: float = 1e-3
    mask_mix: tuple[float, float, float] = (1.0, 0.0, 0.0)   # iid / block / eos rows (mask_canvas)
    full_mask: float = 0.0            # share of rows whose whole answer is masked (mask_canvas)
    seed: int = 0
    threads: int = 2                  # fixed, so float reductions (and the weights) reproduce
    device: str = "cpu"
    log_every: int = 25
    stop_after: int | None = None     # run only the first N steps of the schedule (reproduction check)
    init: str | None = None           # checkpoint directory to start from instead of random weights


def _init_weights_(model: torch.nn.Module, seed: int, n_layers: int) -> None:
    """GPT-2-style initialisation: N(0, 0.02), residual output projections scaled by
    1/sqrt(2 n_layers), norms at 1, biases at 0."""
    g = torch.Generator().manual_seed(seed)
    residual_out = re.compile(r"(blocks\.\d+\.(attn_out|ff_out)|o_proj|down_proj)\.weight$")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            std = 0.02 / math.sqrt(2 * n_layers) if residual_out.search(name) else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)


class Batcher:
    """Seeded stream of training batches: prompts left-padded, answers (+ EOS padding) after.
    Each row's task is drawn with odds `task_weights` (equal odds draw as the first reference
    models were trained, so their commands still reproduce them)."""

    def __init__(self, cfg: TrainConfig, tok) -> None:
        self.cfg = cfg
        self.vocab = tok.get_vocab()
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.rng = random.Random(f"train/{cfg.seed}")
        self.streams = [get_task(n).stream("train", cfg.seed) for n in cfg.tasks]
        w = cfg.task_weights
        if w and len(w) != len(cfg.tasks):
            raise ValueError(f"task_weights has {len(w)} entries for {len(cfg.tasks)} tasks "
                             f"({', '.join(cfg.tasks)})")
        self.weights = w if w and any(x != w[0] for x in w) else None    # None: equal odds

    def _encode(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text]

    def _sample(self) -> tuple[list[int], list[int]]:
        if self.weights is None:
            p = next(self.streams[self.rng.randrange(len(self.streams))])
        else:
            p = next(self.rng.choices(self.streams, weights=self.weights)[0])
        return self._encode(p.prompt), self._encode(p.answer)

    def next(self, canvas: int | None) -> tuple[Tensor, Tensor, int]:
        """-> ids (B, P + G) long, attention mask (B, P + G) bool, prompt width P. With
        `canvas` None (AR) the answer gets one EOS and rows are right-padded instead."""
        rows = [self._sample() for _ in range(self.cfg.batch_size)]
        P = max(len(p) for p, _ in rows)
        if canvas is None:
            G = max(len(a) for _, a in rows) + 1
        else:
            G = canvas
        ids = torch.full((len(rows), P + G), self.pad, dtype=torch.long)
        att = torch.zeros(len(rows), P + G, dtype=torch.bool)
        for b, (p, a) in enumerate(rows):
            ids[b, P - len(p):P] = torch.tensor(p)
            att[b, P - len(p):P] = True
            if canvas is None:
                ans = a + [self.eos]
                ids[b, P:P + len(ans)] = torch.tensor(ans)
                att[b, P:P + len(ans)] = True
            else:
                ids[b, P:P + len(a)] = torch.tensor(a)
                ids[b, P + len(a):] = self.eos
                att[b, P:] = True
        return ids, att, P


def mask_canvas(ids: Tensor, P: int, eos_id: int, eps: float, gen: torch.Generator,
                mix: tuple[float, float, float] = (1.0, 0.0, 0.0), full: float = 0.0) -> tuple[Tensor, Tensor]:
    """Choose the masked answer positions of each row -> masked (B, L) bool, weight (B,).

    A row follows one of three schemes (probabilities `mix`):
      iid     LLaDA's: each answer position masked with probability t; weight 1/t.
      block   the state semi-autoregressive decoding visits: positions before a block boundary
              (a multiple of 8 or 32, in the answer text) revealed, the block masked with
              probability t, everything after it masked; weight G / #masked.
      eos     the state low-confidence decoding visits, where the confident EOS padding is
              committed before the answer: answer masked with probability t, EOS padding with
              probability t * v (v ~ U(0, 1)); weight G / #masked.
    A small model trained on iid masks alone rarely sees these states and does worse in them:
    the first llada-reference, trained that way, failed semi-autoregressive blocks. The shipped
    llada-reference is trained with (0.6, 0.2, 0.2); the default (1, 0, 0) is LLaDA's objective alone.
    A share `full` of rows, whatever their scheme, instead masks the whole answer and the EOS
    padding with probability v (weight G / #masked): the state of the first commit, where a
    free choice (which option `repeat` repeats) is made, and which iid rows seldom show (all n
    digits hidden with probability t^n). Off by default. The shipped diffusion models use 0.2 in
    a short second stage (--init) after a first stage without it: from the start, the full rows
    held back learning `case` and `copy` (the model cards give the numbers).
    t is stratified over the batch, so every batch spans (eps, 1]."""
    B, L = ids.shape
    G = L - P
    u = torch.rand(1, generator=gen).item()
    t = eps + (1 - eps) * ((torch.arange(B) + u) / B)[torch.randperm(B, generator=gen)]   # (B,)
    draw = torch.rand(B, G, generator=gen)                                                # (B, G)
    iid = draw < t[:, None]
    masked = torch.zeros(B, L, dtype=torch.bool)
    if mix[1] == 0 and mix[2] == 0 and full == 0:     # LLaDA's objective alone
        masked[:, P:] = iid
        return masked.to(ids.device), (1.0 / t).to(ids.device)

    scheme = torch.multinomial(torch.tensor(mix, dtype=torch.float), B, replacement=True, generator=gen)    # (B,)
    col = torch.arange(G).unsqueeze(0)                                                    # (1, G)
    bs = torch.where(torch.rand(B, generator=gen) < 0.5, 8, 32)                          # (B,)
    # the block being decoded holds answer text (a block inside the EOS padding teaches only
    # EOS, which iid and eos rows already do)
    is_eos = ids[:, P:].cpu() == eos_id
    answer_len = torch.where(is_eos.any(1), is_eos.long().argmax(1), G).clamp(min=1)     # (B,)
    n_blocks = (answer_len + bs - 1) // bs
    start = (torch.rand(B, generator=gen) * n_blocks).long() * bs                         # (B,)
    in_block = (col >= start[:, None]) & (col < (start + bs)[:, None])
    block = (in_block & iid) | (col >= (start + bs)[:, None])
    v = torch.rand(B, generator=gen)
    eos = torch.where(is_eos, draw < (t * v)[:, None], iid)

    gen_mask = torch.where((scheme == 0)[:, None], iid, torch.where((scheme == 1)[:, None], block, eos))
    relative = scheme != 0
    if full > 0:        # drawn last, so a run without full rows keeps every earlier draw
        whole = torch.rand(B, generator=gen) < full                                       # (B,)
        gen_mask = torch.where(whole[:, None], ~is_eos | (draw < v[:, None]), gen_mask)
        relative = relative | whole
    n = gen_mask.sum(1).clamp(min=1)                                                      # (B,)
    weight = torch.where(relative, G / n, 1.0 / t)
    masked[:, P:] = gen_mask
    return masked.to(ids.device), weight.to(ids.device)


def diffusion_loss(model, ids: Tensor, att: Tensor, P: int, mask_id: int, eos_id: int, eps: float,
                   gen: torch.Generator, mix: tuple[float, float, float] = (1.0, 0.0, 0.0),
                   full: float = 0.0) -> Tensor:
    """Masked-diffusion loss on ids (B, P+G): weighted cross-entropy on the masked answer
    positions, normalised by B * G (LLaDA's SFT form for iid rows)."""
    B, L = ids.shape
    masked, weight = mask_canvas(ids, P, eos_id, eps, gen, mix, full)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, attention_mask=att)                                  # (B, L, V)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")  # (n,)
    w = weight[:, None].expand(B, L)[masked]
    return (ce * w).sum() / (B * (L - P))


def ar_loss(model, ids: Tensor, att: Tensor, P: int) -> Tensor:
    """Next-token loss on the answer and its EOS; prompt tokens and padding are not targets."""
    B, L = ids.shape
    pos = (att.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=att.long(), position_ids=pos).logits    # (B, L, V)
    target = ids[:, 1:].clone()
    keep = att[:, 1:].clone()
    keep[:, :P - 1] = False
    target[~keep] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def build(cfg: TrainConfig, tok):
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    if cfg.family == "ar":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_heads, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, attention_bias=False, mlp_bias=False)
        model = LlamaForCausalLM(hf)
    else:
        from dllm_decode.models import build_random_model

        model = build_random_model(cfg.family, vocab_size=len(tok), d_model=cfg.d_model,
                                   n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                   n_kv_heads=cfg.n_heads if cfg.family == "llada" else cfg.n_heads // 2,
                                   mlp_hidden=cfg.mlp_hidden, mask_token_id=tok.mask_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   eot_token_id=eot, max_length=1024, rope_theta=10000.0)
    if cfg.init:
        model.load_state_dict(_load_init(cfg).state_dict())
    else:
        _init_weights_(model, cfg.seed, cfg.n_layers)
    return model.to(cfg.device).train().requires_grad_(True)


def _init_record(cfg: TrainConfig) -> dict:
    """The training.json of the checkpoint `cfg.init` names, checked against the family and size
    `cfg` asks for before anything is written (a mismatch would otherwise surface as a state-dict
    error naming parameters)."""
    path = Path(cfg.init)
    meta_path = path / "training.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"--init {path}: no training.json (a checkpoint written by this script)")
    record = json.loads(meta_path.read_text())
    base = record["config"]
    for key in ("family", "d_model", "n_layers", "n_heads", "mlp_hidden"):
        if base[key] != getattr(cfg, key):
            raise ValueError(f"--init {path}: {meta_path} has {key} {base[key]!r}, this run asks for "
                             f"{getattr(cfg, key)!r}")
    return record


def _load_init(cfg: TrainConfig) -> torch.nn.Module:
    """The weights of the checkpoint `cfg.init` names (checked by `_init_record`)."""
    path = Path(cfg.init)
    if cfg.family == "ar":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(str(path))
    from dllm_decode.models import load_model

    return load_model(path, tokenizer=False)[0]


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    record = _init_record(cfg) if cfg.init else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_stages(Path(cfg.init), record, out) if record is not None else None
    tok = save_char_tokenizer(out)
    model = build(cfg, tok)
    batcher = Batcher(cfg, tok)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    canvas_rng = random.Random(f"canvas/{cfg.seed}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    n_steps = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_steps, desc=f"train {cfg.family}", unit="step")
    log_path = out / "loss_log.jsonl"
    log_file = log_path.open("w")     # written as it goes, so a long run can be watched
    t0 = time.perf_counter()
    running = None
    for step in range(n_steps):
        if cfg.family == "ar":
            ids, att, P = batcher.next(None)
        else:
            G = canvas_rng.choices(cfg.canvas, weights=cfg.canvas_weights)[0]
            ids, att, P = batcher.next(G)
        ids, att = ids.to(cfg.device), att.to(cfg.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        if cfg.family == "ar":
            loss = ar_loss(model, ids, att, P)
        else:
            loss = diffusion_loss(model, ids, att, P, tok.mask_token_id, tok.eos_token_id, cfg.eps, gen,
                                  cfg.mask_mix, cfg.full_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        val = float(loss.detach())
        running = val if running is None else 0.95 * running + 0.05 * val
        if step % cfg.log_every == 0 or step == cfg.steps - 1:   # same lines whatever stop_after
            log_file.write(json.dumps({"step": step, "loss": round(val, 5), "smoothed": round(running, 5),
                                       "lr": round(lr_at(step), 7),
                                       "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
            log_file.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
    if bar is not None:
        bar.close()
    log_file.close()

    model.eval().requires_grad_(False)
    if cfg.family == "ar":
        model.save_pretrained(str(out))
    else:
        from dllm_decode.models import save_pretrained
        save_pretrained(model, out)
    meta = {"config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters())}
    if earlier is not None:
        meta["init"] = earlier
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def stage_log(n: int) -> str:
    """File name of stage n's loss log (1 = the first) in a checkpoint trained in stages."""
    return f"loss_log.stage{n}.jsonl"


def _earlier_stages(base: Path, record: dict, out: Path) -> dict:
    """Keep in `out` what a later stage needs of the checkpoint `base` it starts from -> base's
    training.json `record` (itself holding any stage before it), recorded as this run's "init".
    Base's loss logs are copied as loss_log.stage{n}.jsonl, so every earlier stage's command can
    be checked against the shipped checkpoint although only the last stage's weights ship."""
    n = stage_depth(record) + 1                      # base is stage n
    logs = {stage_log(k): (base / stage_log(k)).read_text() for k in range(1, n)}
    logs[stage_log(n)] = (base / "loss_log.jsonl").read_text()
    for name, text in logs.items():                  # read first: `out` may be `base`
        (out / name).write_text(text)
    return record


def _read_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def stage_depth(meta: dict) -> int:
    """How many stages came before the one `meta` (a training.json) records."""
    return 0 if "init" not in meta else 1 + stage_depth(meta["init"])


def check_log(run: Path, shipped: Path, rel: float = 1e-3) -> tuple[int, str | None]:
    """Compare the loss log of `run` with the first lines of `shipped`'s -> (lines compared,
    first mismatch or None). Losses must agree to `rel`: the same command on another CPU may
    round differently (other kernels), but other data, masks or initialisation miss by far more.
    When `shipped` was trained in stages, `run` is compared with the stage at its own depth: a
    rerun of the first stage's command with the first stage's log."""
    run, shipped = Path(run), Path(shipped)
    ours = _read_log(run / "loss_log.jsonl")
    meta = json.loads((shipped / "training.json").read_text())
    ran = json.loads((run / "training.json").read_text()) if (run / "training.json").exists() else {}
    depth, ran_depth = stage_depth(meta), stage_depth(ran)
    if ran_depth > depth:
        return 0, (f"{run} was trained in {ran_depth + 1} stages, {shipped} in "
                   f"{depth + 1}: no stage of {shipped} to compare with")
    log = shipped / ("loss_log.jsonl" if ran_depth == depth else stage_log(ran_depth + 1))
    theirs = _read_log(log)
    for n, (a, b) in enumerate(zip(ours, theirs)):
        if a["step"] != b["step"] or a["lr"] != b["lr"] or abs(a["loss"] - b["loss"]) > rel * abs(b["loss"]):
            return n, (f"step {a['step']}: loss {a['loss']} lr {a['lr']} here, "
                       f"step {b['step']}: loss {b['loss']} lr {b['lr']} in {log}")
    return min(len(ours), len(theirs)), None


def main(argv: list[str] | None = None) -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description="Train a reference model on the task suite.")
    ap.add_argument("--family", choices=("llada", "dream", "ar"), default=d.family)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tasks", default=",".join(d.tasks))
    ap.add_argument("--task-weights", default=None, help="sampling odds of the tasks, comma-separated "
                    "(default: equal)")
    for name in ("steps", "batch_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "seed",
                 "threads", "warmup"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--canvas", default=",".join(map(str, d.canvas)),
                    help="generation lengths to train at, sampled per batch")
    ap.add_argument("--mask-mix", default=",".join(map(str, d.mask_mix)),
                    help="probabilities of iid / block / eos masking rows (see mask_canvas)")
    ap.add_argument("--full-mask", type=float, default=d.full_mask,
                    help="share of rows whose whole answer is masked (see mask_canvas)")
    ap.add_argument("--init", metavar="DIR", help="start from this checkpoint (same family and size, "
                    "written by this script) instead of random weights: a second training stage")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after the first N steps of the schedule; its loss_log.jsonl must then "
                         "match the first lines of a full run's (see --check)")
    ap.add_argument("--check", metavar="DIR", help="after training, compare the loss log with DIR's "
                    "(a shipped checkpoint trained by the same command); exit 1 on a mismatch")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    canvas = tuple(int(c) for c in a.canvas.split(","))
    weights = d.canvas_weights if canvas == d.canvas else tuple(1.0 for _ in canvas)
    tasks = tuple(a.tasks.split(","))
    task_weights = tuple(float(w) for w in a.task_weights.split(",")) if a.task_weights else ()
    cfg = TrainConfig(family=a.family, out=a.out, tasks=tasks, task_weights=task_weights, steps=a.steps,
                      batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, d_model=a.d_model,
                      n_layers=a.n_layers, n_heads=a.n_heads, mlp_hidden=a.mlp_hidden, canvas=canvas,
                      canvas_weights=weights, seed=a.seed, threads=a.threads, device=a.device,
                      mask_mix=tuple(float(m) for m in a.mask_mix.split(",")), full_mask=a.full_mask,
                      stop_after=a.stop_after, init=a.init)
    out = train(cfg, progress=not a.no_progress)
    print(out)
    if a.check:
        n, mismatch = check_log(out, Path(a.check))
        if mismatch:
            raise SystemExit(f"loss log differs from {a.check}'s: {mismatch}")
        print(f"loss log matches {a.check}'s over its first {n} lines")


if __name__ == "__main__":
    main()

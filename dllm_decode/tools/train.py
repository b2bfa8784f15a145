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

``sdar`` / ``fast_dllm_v2``: block diffusion (block-causal attention), from an AR ``--init`` as SDAR
adapts Qwen3 (aligned logits, ``block_diffusion_loss``) and Fast-dLLM v2 adapts Qwen2.5 (shifted
logits, complementary masks, ``shifted_block_diffusion_loss``).

``ar``: a standard ``LlamaForCausalLM`` trained by next-token prediction on the answer and one
EOS (prompt tokens are not targets); it is APD's verifier and the autoregressive baseline.

Training is deterministic for a given seed and thread count: problems come from the seeded
``train`` split, batches from a seeded generator, and the step count is fixed (no wall-clock
schedule), so a rerun reproduces the checkpoint.

``--init DIR`` starts a second stage from a checkpoint this script wrote (same family and size)
with its own schedule, seed and masking; the new ``training.json`` keeps the first stage's
record and loss log, so the model card can show both commands and ``--check`` can compare a
rerun of either stage with the shipped logs. A diffusion run may also start from an AR
checkpoint (``--family dream --init AR_DIR``, as Dream-7B was adapted from Qwen2.5; see adapt.py).
``--attention-anneal N`` then opens the AR model's causal attention to full attention over the
first N steps, as DiffuLLaMA did (``anneal_attend``), instead of switching it at once;
``--repr-align W`` (Dream) adds REPR-ALIGN's pull of every layer's hidden states towards the frozen
AR model's (``repr_align_loss``); ``--mlp-lr-scale S`` trains the layers' MLP matrices at a share S
of the rate (``optimizer``).

Long runs checkpoint into their folder (``--checkpoint-every N`` steps, ``--checkpoint-minutes
M``, on SIGTERM / Ctrl-C, and when ``--stop-after`` ends a run early): weights, optimizer, schedule
position, every random state and the task streams' positions (train_state.py). ``--resume DIR``
continues such a run to the same weights, bit for bit, that it would have reached uninterrupted.
A run a signal stopped exits 128 + the signal's number (130 for Ctrl-C), saying how to resume it.

The workload models (``--tasks workload``) add what their longer answers need: ``--batch-by-task``
draws one task per batch (so a batch pads to its own task's lengths, and a diffusion batch gets a
canvas drawn among those its task fits), ``--batch-tokens`` sizes each batch to a token budget,
``--max-length`` declares positions beyond 1024, ``--autocast bf16`` runs the forward in bfloat16
(master weights and optimizer stay float32). None of these changes what the other flags compute.

``--probe-every N`` reads ``--probe-n`` held-out problems per task left to right (tools.probe)
before the first step, every N steps and at the end, into probe_log.jsonl: a run's loss is no guide
to how it decodes (a high rate lowers the loss fastest and reads worst), its reading is. The
reading draws no random numbers and its time is not counted, so the weights and loss log are
those of a run without it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_decode.measure.tasks import MIXES, REFERENCE_MIX, get_task, task_names
from dllm_decode.models.layers import position_ids_from_mask
from dllm_decode.tools.char_tokenizer import save_char_tokenizer
from dllm_decode.tools.train_state import CHECKPOINT as CHECKPOINT_NAME
from dllm_decode.tools.train_state import Progress, read_checkpoint, restore, save_checkpoint


FAMILIES = ("llada", "dream", "sdar", "fast_dllm_v2", "ar")
BLOCK_FAMILIES = ("sdar", "fast_dllm_v2")      # block-causal, trained by block diffusion


@dataclass
class TrainConfig:
    family: str = "llada"             # llada | dream | sdar | fast_dllm_v2 | ar
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
    fit_canvas: bool = False          # sdar, fast_dllm_v2: each batch's canvas fitted to its answers (fitted_canvas)
    eps: float = 1e-3
    mask_mix: tuple[float, float, float] = (1.0, 0.0, 0.0)   # iid / block / eos rows (mask_canvas)
    full_mask: float = 0.0            # share of rows whose whole answer is masked (mask_canvas)
    end_rows: float = 0.0             # share of rows whose block sits at the answer's end (mask_canvas)
    frontier_rows: float = 0.0        # share of rows masked from a uniform frontier on (mask_canvas)
    loss_weight: str = "mdlm"         # mdlm: 1/t (or G/#masked) per row | cart: per token (cart_weight)
    cart_p: float = 0.3               # cart: the geometric decay of a revealed token's weight with distance
    attention_anneal: int = 0         # llada/dream: open causal attention to full over N steps (anneal_attend)
    repr_align: float = 0.0           # dream from an AR --init: weight of the layer alignment to it (repr_align_loss)
    mlp_lr_scale: float = 1.0         # the MLP weights' rate as a share of the schedule's (optimizer)
    seed: int = 0
    threads: int = 2                  # fixed, so float reductions (and the weights) reproduce
    device: str = "cpu"
    log_every: int = 25
    stop_after: int | None = None     # run only the first N steps of the schedule (reproduction check)
    init: str | None = None           # checkpoint directory to start from instead of random weights
    n_kv_heads: int = 0               # 0: the family's default (llada, ar: n_heads; dream: n_heads // 2)
    max_length: int = 1024            # positions the model declares (prompt + canvas must fit)
    autocast: str = "none"            # none | bf16: the forward and loss under bfloat16 autocast
    compile: bool = False             # torch.compile the model (fused kernels: same math, other rounding)
    batch_by_task: bool = False       # one task per batch (drawn with task_weights), see Batcher
    batch_tokens: int = 0             # with batch_by_task: rows per batch fill this many padded tokens
    task_groups: tuple[int, ...] = ()  # with batch_by_task: a group id per task; a batch mixes its group's tasks
    checkpoint_every: int = 0         # write checkpoint.pt every N steps (0: never by count)
    checkpoint_minutes: float = 0.0   # ... and every M minutes of wall clock (0: never by time)
    block_size: int = 4               # sdar, fast_dllm_v2: the block size (config.json block_size / bd_size)
    block_sizes: tuple[int, ...] = ()  # sdar, fast_dllm_v2: block sizes trained at, one drawn per batch (): block_size
    probe_every: int = 0              # read held-out problems left to right every N steps (0: never)
    probe_n: int = 8                  # ... this many per task
    probe_tasks: tuple[str, ...] = ()  # ... of these tasks (): the run's own

    def last_step(self) -> int:
        """Where this session of the run ends: the schedule's end, or stop_after."""
        return self.steps if self.stop_after is None else min(self.steps, self.stop_after)

    def fit_unit(self) -> int:
        """What a fitted canvas is rounded to: every block size the run trains at divides it."""
        return math.lcm(*(self.block_sizes or (self.block_size,)))

    def kv_heads(self) -> int:
        if self.n_kv_heads:
            return self.n_kv_heads
        return self.n_heads // 2 if self.family == "dream" else self.n_heads


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


def _check_fit(cfg: TrainConfig, tasks, positions: bool = True) -> None:
    """Every task's longest answer (+ EOS) fits every canvas it can be drawn with, the positions
    fit --max-length, and batch_tokens can be sized from the tasks' declared lengths: refused
    before anything is written, not at the first long batch hours in. Without --batch-by-task
    any canvas can meet any task, so the shortest must fit; with it (or --fit-canvas) a batch
    only draws the canvases its task fits, so the longest must."""
    if cfg.family != "ar":
        bound = max(cfg.canvas) if cfg.batch_by_task or cfg.fit_canvas else min(cfg.canvas)
        for t in tasks:
            if t.max_answer_tokens + 1 > bound:
                raise ValueError(f"--canvas {bound} is too short for task {t.name!r}, whose "
                                 f"answers run to {t.max_answer_tokens} tokens (+ EOS)")
    for t in tasks:
        if cfg.batch_by_task and cfg.batch_tokens and not t.max_prompt_tokens:
            raise ValueError(f"--batch-tokens needs task {t.name!r} to declare max_prompt_tokens")
        # positions: a run's check (check_config); a Batcher alone builds no model to declare them
        if not positions or not t.max_prompt_tokens:     # undeclared: nothing to check them against
            continue
        if cfg.family == "ar":
            width = t.max_answer_tokens + 1
        elif cfg.fit_canvas:
            width = t.max_answer_tokens + cfg.fit_unit()
        else:
            width = max(cfg.canvas)
        if t.max_prompt_tokens + width > cfg.max_length:
            raise ValueError(f"--max-length {cfg.max_length} is shorter than task {t.name!r}'s longest prompt "
                             f"({t.max_prompt_tokens}) and canvas ({width}): declare at least "
                             f"{t.max_prompt_tokens + width} positions")


class Batcher:
    """Seeded stream of training batches: prompts left-padded, answers (+ EOS padding) after.
    Each row's task is drawn with odds `task_weights` (equal odds draw as the first reference
    models were trained, so their commands still reproduce them). With `batch_by_task` the task
    is drawn once per batch instead, or with `task_groups` a group of tasks whose rows are then
    mixed (see `task_batch`)."""

    def __init__(self, cfg: TrainConfig, tok) -> None:
        self.cfg = cfg
        self.vocab = tok.get_vocab()
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        self.rng = random.Random(f"train/{cfg.seed}")
        self.tasks = [get_task(n) for n in cfg.tasks]
        self.streams = [t.stream("train", cfg.seed) for t in self.tasks]
        w = cfg.task_weights
        if w and len(w) != len(cfg.tasks):
            raise ValueError(f"task_weights has {len(w)} entries for {len(cfg.tasks)} tasks "
                             f"({', '.join(cfg.tasks)})")
        self.weights = w if w and any(x != w[0] for x in w) else None    # None: equal odds
        g = cfg.task_groups
        if g and len(g) != len(cfg.tasks):
            raise ValueError(f"task_groups has {len(g)} entries for {len(cfg.tasks)} tasks "
                             f"({', '.join(cfg.tasks)})")
        if g and not cfg.batch_by_task:
            raise ValueError("task_groups (--task-groups) needs --batch-by-task")
        # each group's task indices; without groups every task is its own group
        self.groups = [[i for i, x in enumerate(g) if x == k] for k in sorted(set(g))] if g else None
        # a group's odds: its tasks' summed odds
        self.group_odds = [sum(w[i] if self.weights else 1.0 for i in grp) for grp in self.groups or ()]
        _check_fit(cfg, self.tasks, positions=False)

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
        return self.layout([self._sample() for _ in range(self.cfg.batch_size)], canvas)

    def task_batch(self, canvas_rng: random.Random) -> tuple[Tensor, Tensor, int]:
        """One batch of a single task (drawn with the task odds) -> as `next`. A diffusion batch's
        canvas is drawn among the listed canvases its task's longest answer fits; with
        batch_tokens the row count fills that budget at the task's longest prompt and canvas (the
        AR family: longest prompt + answer + EOS), so a step costs about the same on every task.
        With task_groups a group is drawn instead (odds: its tasks' summed odds), sized by its
        longest task, and each row draws its task within the group: short tasks share batches,
        so no task waits several steps for its next gradient, without padding them to the
        longest answer (the 12.8M AR model learned a fixed-offset copy in 300 steps with copy
        in every batch, and not in 2,185 steps as one of five one-task batches)."""
        cfg = self.cfg
        if self.groups is None:
            members = [self.rng.choices(range(len(self.tasks)), weights=self.weights or None)[0]]
        else:
            members = self.groups[self.rng.choices(range(len(self.groups)), weights=self.group_odds)[0]]
        longest = max((self.tasks[i] for i in members), key=lambda t: t.max_answer_tokens)
        canvas = None
        if cfg.fit_canvas:              # bounds the fitted canvas (see fitted_canvas); no draw
            bound = longest.max_answer_tokens + cfg.fit_unit()
        elif cfg.family != "ar":
            fits = [(c, w) for c, w in zip(cfg.canvas, cfg.canvas_weights) if c > longest.max_answer_tokens]
            canvas = canvas_rng.choices([c for c, _ in fits], weights=[w for _, w in fits])[0]
        n = cfg.batch_size
        if cfg.batch_tokens:
            width = max(self.tasks[i].max_prompt_tokens for i in members) + \
                (bound if cfg.fit_canvas else canvas or longest.max_answer_tokens + 1)
            n = max(1, cfg.batch_tokens // width)
        rows = []
        for _ in range(n):
            i = members[0] if len(members) == 1 else \
                self.rng.choices(members, weights=[self.weights[j] for j in members] if self.weights else None)[0]
            p = next(self.streams[i])
            rows.append((self._encode(p.prompt), self._encode(p.answer)))
        return self.layout(rows, canvas)

    def layout(self, rows: list[tuple[list[int], list[int]]], canvas: int | None) -> tuple[Tensor, Tensor, int]:
        """Rows of (prompt ids, answer ids) -> ids (B, P + G), attention mask (B, P + G), P. With
        fit_canvas the canvas is the rows' fitted one (`canvas` is then None)."""
        if self.cfg.fit_canvas:
            canvas = fitted_canvas(rows, self.cfg.fit_unit())
        P = max(len(p) for p, _ in rows)
        G = max(len(a) for _, a in rows) + 1 if canvas is None else canvas
        if G < max(len(a) for _, a in rows) + 1:     # the EOS after the answer is a target: it must fit
            raise ValueError(f"an answer of {max(len(a) for _, a in rows)} tokens and its EOS do not fit "
                             f"canvas {G} (--canvas)")
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


def fitted_canvas(rows: list[tuple[list[int], list[int]]], unit: int) -> int:
    """The shortest canvas holding every row's answer, its EOS and the rest of the block that EOS
    falls in, blocks of `unit` counted from the row's first token (as ``block_masks`` and the
    decoder count them), so each row's last block is whole. At most the longest answer + `unit`;
    a block-causal decoder stops at the block holding EOS, so longer EOS padding teaches it
    nothing and costs a step positions (a block family's step is four times them)."""
    return max(-(-(len(p) + len(a) + 1) // unit) * unit - len(p) for p, a in rows)


def mask_canvas(ids: Tensor, P: int, eos_id: int, eps: float, gen: torch.Generator,
                mix: tuple[float, float, float] = (1.0, 0.0, 0.0), full: float = 0.0,
                end: float = 0.0, frontier: float = 0.0) -> tuple[Tensor, Tensor]:
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
    A share `end` of rows, drawn after `full` (so a run without them keeps every earlier draw), is
    a block row whose 32-position block starts 0 to 40 positions before the answer's end, its first
    position always masked: the states in which a left-to-right decode writes the final line and
    decides to stop. Uniform blocks put the decoding frontier there about once per answer's worth
    of blocks; on a long answer (``ladder``: about 25 blocks of 32) a Dream model trained that way
    had not learned to stop after 1,600 answers, where an AR model had after 800. Off by default.
    A share `frontier` of rows, drawn last, reveals the answer up to a frontier drawn uniformly
    from 0 to the answer's length and masks everything from it on (weight G / #masked): the state
    a left-to-right decode is in before each commit, at every position, where block rows put
    their revealed edge only at multiples of 8 or 32. Off by default.
    t is stratified over the batch, so every batch spans (eps, 1]."""
    B, L = ids.shape
    G = L - P
    u = torch.rand(1, generator=gen).item()
    t = eps + (1 - eps) * ((torch.arange(B) + u) / B)[torch.randperm(B, generator=gen)]   # (B,)
    draw = torch.rand(B, G, generator=gen)                                                # (B, G)
    iid = draw < t[:, None]
    masked = torch.zeros(B, L, dtype=torch.bool)
    if mix[1] == 0 and mix[2] == 0 and full == 0 and end == 0 and frontier == 0:     # LLaDA's objective alone
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
    block = _block_row(col, start, bs, iid)
    v = torch.rand(B, generator=gen)
    eos = torch.where(is_eos, draw < (t * v)[:, None], iid)

    gen_mask = torch.where((scheme == 0)[:, None], iid, torch.where((scheme == 1)[:, None], block, eos))
    relative = scheme != 0
    if full > 0:        # drawn last, so a run without full rows keeps every earlier draw
        whole = torch.rand(B, generator=gen) < full                                       # (B,)
        gen_mask = torch.where(whole[:, None], ~is_eos | (draw < v[:, None]), gen_mask)
        relative = relative | whole
    if end > 0:         # drawn after the full rows, for the same reason
        at_end = torch.rand(B, generator=gen) < end                                       # (B,)
        s = (answer_len - (torch.rand(B, generator=gen) * 41).long()).clamp(min=0)        # (B,) block start
        gen_mask = torch.where(at_end[:, None], _block_row(col, s, 32, iid) | (col == s[:, None]), gen_mask)
        relative = relative | at_end
    if frontier > 0:    # drawn last, for the same reason
        at_frontier = torch.rand(B, generator=gen) < frontier                             # (B,)
        f = (torch.rand(B, generator=gen) * (answer_len + 1)).long()                      # (B,) 0..answer_len
        gen_mask = torch.where(at_frontier[:, None], col >= f[:, None], gen_mask)
        relative = relative | at_frontier
    n = gen_mask.sum(1).clamp(min=1)                                                      # (B,)
    weight = torch.where(relative, G / n, 1.0 / t)
    masked[:, P:] = gen_mask
    return masked.to(ids.device), weight.to(ids.device)


def _block_row(col: Tensor, start: Tensor, size: Tensor | int, iid: Tensor) -> Tensor:
    """A semi-autoregressive state -> (B, G) bool: before `start` (B,) revealed, the block of `size`
    masked where `iid` (B, G) is, everything after it masked. col: (1, G) answer positions."""
    in_block = (col >= start[:, None]) & (col < (start + size)[:, None])
    return (in_block & iid) | (col >= (start + size)[:, None])


def cart_weight(masked: Tensor, att: Tensor, p: float) -> Tensor:
    """Dream's context-adaptive token-level weights (CART, arXiv 2508.15487) -> (B, L).

    A masked position n weighs 1/2 * sum over the revealed positions i != n of p (1-p)^(|n-i|-1):
    a token whose neighbours are revealed (the prompt counts; left padding does not) is a
    well-posed target and weighs up to 1, one far from any revealed token little. It replaces
    the per-row 1/t, which weighs every masked token of a row alike. p = 0.3 as the dLLM
    library's Dream trainer (ZHZisZZ/dllm, dllm/pipelines/dream/trainer.py)."""
    L = masked.shape[1]
    pos = torch.arange(L, device=masked.device)
    dist = (pos[None, :] - pos[:, None]).abs()                                    # (L, L)
    geo = 0.5 * p * (1 - p) ** (dist - 1).clamp(min=0).float()
    geo = geo.masked_fill(dist == 0, 0.0)                                        # symmetric
    revealed = (att.bool() & ~masked).float()                                    # (B, L)
    with torch.autocast(masked.device.type, enabled=False):   # weights in float32 under --autocast bf16
        return (revealed @ geo) * masked                                         # (B, L)


def anneal_attend(att: Tensor, step: int, steps: int, seed: int) -> Tensor | None:
    """DiffuLLaMA's attention-mask annealing (arXiv 2410.17891; HKUNLP/DiffuLLaMA, ddm/trainer.py):
    while adapting an AR model, step s (from 0) of `steps` attends causally plus a random share
    (s + 1) / steps of the other query-key pairs, one draw for the batch, so the model leaves the
    causal attention its weights were trained with gradually. -> (B, L, L) bool, or None once the
    share reaches 1 (full attention). Causal by RoPE position (the attention mask's running count),
    so a left-padding query still sees the first real token. The draw comes from its own generator
    seeded by (seed, step): a resumed run redraws it, and the masks drawn are those of a run without it."""
    share = (step + 1) / steps if steps else 1.0
    if share >= 1:
        return None
    L = att.shape[1]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draw = (torch.rand(L, L, generator=g) < share).to(att.device)              # (L, L): query x key, rows share it
    return causal_attend(att) | draw[None]                                     # (B, L, L)


def causal_attend(att: Tensor) -> Tensor:
    """An AR model's attention on a (B, L) padded canvas, by RoPE position (the attention mask's
    running count), so a left-padding query still sees the first real token. -> (B, L, L) bool."""
    pos = position_ids_from_mask(att, *att.shape, att.device)                  # (B, L)
    return pos[:, None, :] <= pos[:, :, None]


def repr_align_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], where: Tensor) -> Tensor:
    """REPR-ALIGN (arXiv 2605.06885; pengzhangzhi/Open-dLLM, the Qwen3 model's `repr_align_wt`):
    1 - the cosine similarity of the student's and the frozen teacher's hidden states, averaged
    over the layers and the positions `where` (B, L) bool. student / teacher: per layer (B, L, d)."""
    s = torch.stack([h[where] for h in student]).float()                       # (layers, n, d)
    t = torch.stack([h[where] for h in teacher]).float()
    return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()


def diffusion_loss(model, ids: Tensor, att: Tensor, P: int, mask_id: int, eos_id: int, eps: float,
                   gen: torch.Generator, mix: tuple[float, float, float] = (1.0, 0.0, 0.0),
                   full: float = 0.0, loss_weight: str = "mdlm", cart_p: float = 0.3,
                   attend: Tensor | None = None, teacher=None, align: float = 0.0, end: float = 0.0,
                   frontier: float = 0.0) -> Tensor:
    """Masked-diffusion loss on ids (B, P+G): weighted cross-entropy on the masked answer
    positions, normalised by B * G (LLaDA's SFT form for iid rows). `loss_weight` "cart" weighs
    each masked token by its revealed context instead (`cart_weight`); the masks drawn are the same.
    `attend` (B, L, L): which keys each query may see (``anneal_attend``); None: all of them.
    `teacher` (a Dream model holding the AR weights the run adapts, frozen) adds `align` times
    ``repr_align_loss`` at the positions whose output carries a masked token's loss (shifted
    logits: the position before it), the teacher reading the clean canvas causally, as the AR
    model does."""
    from dllm_decode.models import ComputePlan

    B, L = ids.shape
    masked, weight = mask_canvas(ids, P, eos_id, eps, gen, mix, full, end, frontier)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    name = "anneal-train" if attend is not None else "train"
    if teacher is None:
        plan = {} if attend is None else {"plan": ComputePlan(attend=attend, name=name)}
        logits, hidden = model(noisy, attention_mask=att, **plan), None        # (B, L, V)
    else:
        out = model.execute(noisy, att, ComputePlan(attend=attend, hidden=True, name=name))
        logits, hidden = out.logits, out.hidden
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")  # (n,)
    if loss_weight == "cart":
        w = cart_weight(masked, att, cart_p)[masked]
    else:
        w = weight[:, None].expand(B, L)[masked]
    loss = (ce * w).sum() / (B * (L - P))
    if teacher is None:
        return loss
    with torch.no_grad():
        taught = teacher.execute(ids, att, ComputePlan(attend=causal_attend(att), hidden=True,
                                                       name="repr-align-teacher")).hidden
    before = torch.cat([masked[:, 1:], torch.zeros_like(masked[:, :1])], dim=1)   # (B, L): next is masked
    return loss + align * repr_align_loss(hidden, taught, before)


def block_attend(pos: Tensor, size: int) -> Tensor:
    """Block diffusion's training mask over ``[noisy | clean]`` copies of a canvas whose RoPE
    positions are ``pos`` (B, L): a noisy position sees the noisy positions of its own block and
    the clean ones of earlier blocks; a clean position sees the clean ones of its block and earlier
    blocks; nothing sees a noisy position from the clean copy. So every noisy block is denoised
    given the clean blocks before it, as a block-causal decoder sees it. -> (B, 2L, 2L) bool."""
    blk = torch.div(pos, size, rounding_mode="floor")                      # (B, L)
    q, k = blk[:, :, None], blk[:, None, :]                                 # (B, L, 1), (B, 1, L)
    top = torch.cat([q == k, k < q], dim=2)                                 # noisy queries
    bottom = torch.cat([torch.zeros_like(top[..., :blk.shape[1]]), k <= q], dim=2)   # clean queries
    return torch.cat([top, bottom], dim=1)


def noisy_copy_logits(model, noisy: Tensor, ids: Tensor, att: Tensor, size: int) -> Tensor:
    """Block diffusion's training forward (BD3-LM's two-copy form): the noisy canvas laid beside the
    clean one on one canvas of 2L positions (RoPE positions repeated), attention by ``block_attend``
    -> the noisy copy's aligned logits (B, L, V). All of a row's blocks are denoised in one forward
    of twice the length. In a shifted family the logit at p is the raw one at p - 1 of the noisy
    copy, the position the reference loss reads it from (also at a block's first position)."""
    from dllm_decode.models import ComputePlan

    B, L = ids.shape
    pos = position_ids_from_mask(att, B, L, att.device)
    plan = ComputePlan(position_ids=torch.cat([pos, pos], dim=1), attend=block_attend(pos, size),
                       name="block-diffusion-train")
    return model.execute(torch.cat([noisy, ids], dim=1), torch.cat([att, att], dim=1), plan).logits[:, :L]


def block_diffusion_loss(model, ids: Tensor, att: Tensor, P: int, mask_id: int, eps: float,
                         gen: torch.Generator, size: int) -> Tensor:
    """Block diffusion's loss (SDAR, arXiv 2510.06303): the answer masked iid with a per-row t, every
    block denoised given the clean ones before it (``noisy_copy_logits``); weighted cross-entropy
    (1/t) on the masked answer positions, normalised by B * G as ``diffusion_loss``."""
    B, L = ids.shape
    masked, weight = mask_canvas(ids, P, -1, eps, gen)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = noisy_copy_logits(model, noisy, ids, att, size)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")  # (n,)
    w = weight[:, None].expand(B, L)[masked]
    return (ce * w).sum() / (B * (L - P))


def block_masks(att: Tensor, P: int, size: int, eps: float, gen: torch.Generator) -> Tensor:
    """Fast-dLLM v2's masks -> (B, L) bool: a ratio t ~ U(0, 1) per block of each row (blocks of
    `size` RoPE positions, counted from the row's first token as the reference counts them from
    the sequence's), and each answer position masked with probability eps + (1 - eps) t of its
    block; the prompt never."""
    B, L = att.shape
    blk = torch.div(position_ids_from_mask(att.cpu(), B, L, "cpu"), size, rounding_mode="floor")   # (B, L)
    t = torch.rand(B, (L - 1) // size + 1, generator=gen)                                # (B, blocks)
    draw = torch.rand(B, L, generator=gen) < (eps + (1 - eps) * t).gather(1, blk)        # (B, L)
    draw[:, :P] = False
    return draw.to(att.device)


def shifted_block_diffusion_loss(model, ids: Tensor, att: Tensor, P: int, mask_id: int, eps: float,
                                 gen: torch.Generator, size: int) -> Tensor:
    """Fast-dLLM v2's loss (arXiv 2509.26328; the training branch of the checkpoints'
    ``modeling.py``): ``block_masks`` and their complement on the answer as two views of every row
    (so each answer token is a target exactly once), every block denoised given the clean ones
    before it (``noisy_copy_logits``) with the AR model's token shift, and cross-entropy on the
    masked positions unweighted, averaged over them (B * G: the two views mask each answer
    position once). A step costs two views of a two-copy canvas: four times a row's tokens."""
    B, L = ids.shape
    masked = block_masks(att, P, size, eps, gen)
    answer = torch.zeros_like(masked)
    answer[:, P:] = True
    views = torch.cat([masked, answer & ~masked])                                        # (2B, L)
    ids2, att2 = ids.repeat(2, 1), att.repeat(2, 1)
    noisy = torch.where(views, torch.full_like(ids2, mask_id), ids2)
    logits = noisy_copy_logits(model, noisy, ids2, att2, size)
    return F.cross_entropy(logits[views].float(), ids2[views], reduction="sum") / (B * (L - P))


def ar_loss(model, ids: Tensor, att: Tensor, P: int) -> Tensor:
    """Next-token loss on the answer and its EOS; prompt tokens and padding are not targets."""
    B, L = ids.shape
    pos = position_ids_from_mask(att, B, L, att.device)
    logits = model(input_ids=ids, attention_mask=att.long(), position_ids=pos).logits    # (B, L, V)
    target = ids[:, 1:].clone()
    keep = att[:, 1:].clone()
    keep[:, :P - 1] = False
    target[~keep] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def build(cfg: TrainConfig, tok, base: dict | None = None, load_init: bool = True):
    """The model of `cfg`: random weights, or `cfg.init`'s (`base` is its training.json; with
    `load_init` False only its shape, for a resumed run whose checkpoint holds the weights)."""
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    if cfg.family == "ar":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads(), max_position_embeddings=cfg.max_length,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, attention_bias=False, mlp_bias=False)
        model = LlamaForCausalLM(hf)
    else:
        from dllm_decode.models import build_random_model

        adapt = base is not None and base["config"]["family"] == "ar"
        model = build_random_model(cfg.family, vocab_size=len(tok), d_model=cfg.d_model,
                                   n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads(),
                                   mlp_hidden=cfg.mlp_hidden, mask_token_id=tok.mask_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   eot_token_id=eot, max_length=cfg.max_length, rope_theta=10000.0,
                                   norm_eps=1e-5 if adapt else None,   # the AR model's RMSNorm eps
                                   **_block_field(cfg))
    if cfg.init and load_init:
        _load_init_(model, cfg, base)
    elif not cfg.init:
        _init_weights_(model, cfg.seed, cfg.n_layers)
    return model.to(cfg.device).train().requires_grad_(True)


def _block_field(cfg: TrainConfig) -> dict:
    """A block-diffusion family's block size under its config.json name."""
    from dllm_decode.models.loader import BLOCK_FIELDS

    return {BLOCK_FIELDS[cfg.family]: cfg.block_size} if cfg.family in BLOCK_FAMILIES else {}


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward through torch.compile (--compile); the same parameters."""
    # dynamic: batches change their rows and length (task, canvas, prompt) step by step
    return torch.compile(model, dynamic=True)


def _init_record(cfg: TrainConfig) -> dict:
    """The training.json of the checkpoint `cfg.init` names, checked against the family and size
    `cfg` asks for before anything is written (a mismatch would otherwise surface as a state-dict
    error naming parameters). A diffusion run may start from an AR checkpoint (adapt.py)."""
    path = Path(cfg.init)
    meta_path = path / "training.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"--init {path}: no training.json (a checkpoint written by this script)")
    if not (path / "loss_log.jsonl").exists():     # the next stage copies it (_earlier_stages)
        raise FileNotFoundError(f"--init {path}: no loss_log.jsonl (a checkpoint written by this script keeps "
                                "its loss log, which the next stage's training.json record needs)")
    record = json.loads(meta_path.read_text())
    base = record["config"]
    adapt = base["family"] == "ar" and cfg.family != "ar"
    for key in ("family", "d_model", "n_layers", "n_heads", "mlp_hidden"):
        if base[key] != getattr(cfg, key) and not (adapt and key == "family"):
            raise ValueError(f"--init {path}: {meta_path} has {key} {base[key]!r}, this run asks for "
                             f"{getattr(cfg, key)!r}")
    theirs = TrainConfig(**{k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__})
    if theirs.kv_heads() != cfg.kv_heads():
        raise ValueError(f"--init {path}: {meta_path} has {theirs.kv_heads()} key/value heads, this run "
                         f"{cfg.kv_heads()} (set --n-kv-heads {theirs.kv_heads()})")
    return record


def _load_init_(model: torch.nn.Module, cfg: TrainConfig, base: dict) -> None:
    """Load the weights of the checkpoint `cfg.init` names (checked by `_init_record`) into `model`."""
    path = Path(cfg.init)
    if cfg.family == "ar":
        from transformers import LlamaForCausalLM

        model.load_state_dict(LlamaForCausalLM.from_pretrained(str(path)).state_dict())
    elif base["config"]["family"] == "ar":
        from safetensors.torch import load_file

        from dllm_decode.tools.adapt import load_ar_weights_

        load_ar_weights_(model, load_file(str(path / "model.safetensors")), cfg.family, str(path))
    else:
        from dllm_decode.models import load_model

        model.load_state_dict(load_model(path, tokenizer=False)[0].state_dict())


def _teacher(cfg: TrainConfig, tok, record: dict) -> torch.nn.Module:
    """--repr-align's teacher: the --init AR weights in the run's own (Dream) layout, frozen; it
    reads causally (``causal_attend``), where it gives the AR model's hidden states. A resumed run
    loads it again from --init, which must still be there."""
    if not (Path(cfg.init) / "model.safetensors").exists():
        raise FileNotFoundError(f"--repr-align: the AR checkpoint {cfg.init} (--init) holds no model.safetensors; "
                                "the alignment's teacher is loaded from it, also when a run resumes")
    return build(cfg, tok, record).eval().requires_grad_(False)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class Run:
    """A training run's live objects."""
    cfg: TrainConfig
    out: Path
    tok: object
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    batcher: Batcher
    gen: torch.Generator
    canvas_rng: random.Random
    progress: Progress = field(default_factory=Progress)
    earlier: dict | None = None         # the --init checkpoint's record, kept in training.json
    compiled: torch.nn.Module | None = None   # --compile: the model's compiled forward (same weights)
    teacher: torch.nn.Module | None = None    # --repr-align: the --init AR weights, frozen (repr_align_loss)
    lock: _Lock | None = None                 # the run folder's lock, held until _finish returns
    stopped_by: int | None = None             # the signal that stopped _finish short of its last step

    def checkpoint(self) -> Path:
        return save_checkpoint(self.out, {**asdict(self.cfg), "stop_after": None}, self.progress,
                               self.model, self.opt, self.batcher, self.gen, self.canvas_rng,
                               extra={"init": self.earlier})


def _settle_vector_math() -> None:
    """One throwaway vector-math call on every intra-op thread. The first such call a fresh
    worker thread makes can take another code path for its chunk (measured on the CPU wheel:
    `cos` of 3,808 floats at 2 threads differed in the last bit for the worker's half in about
    1 process in 8, never after a first call). RoPE's first tables would then differ between
    processes, and a resumed run would miss the weights of an uninterrupted one."""
    n = 4096 * torch.get_num_threads()          # above the 2,048-element grain, so every thread works
    for dtype in (torch.float32, torch.float64):
        torch.arange(n, dtype=dtype).exp()


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that contradict each other or the family, before anything is built or written
    (a ValueError naming the flag)."""
    _check_values(cfg)
    if cfg.autocast not in ("none", "bf16"):
        raise ValueError(f"--autocast {cfg.autocast!r}: use 'none' or 'bf16'")
    if cfg.loss_weight not in ("mdlm", "cart"):
        raise ValueError(f"--loss-weight {cfg.loss_weight!r}: use 'mdlm' or 'cart'")
    if cfg.loss_weight == "cart" and cfg.family not in ("llada", "dream"):
        raise ValueError(f"--loss-weight cart weighs masked tokens; family {cfg.family!r} has no such loss "
                         "(use it with --family llada or dream)")
    if cfg.attention_anneal < 0:
        raise ValueError(f"--attention-anneal {cfg.attention_anneal}: use a step count of at least 0 (0: off)")
    if cfg.attention_anneal and cfg.family not in ("llada", "dream"):
        raise ValueError(f"--attention-anneal opens an AR model's causal attention to a bidirectional "
                         f"one; family {cfg.family!r} does not attend bidirectionally (use llada or dream)")
    if cfg.repr_align < 0:
        raise ValueError(f"--repr-align {cfg.repr_align}: use a weight of at least 0 (0: off)")
    if cfg.mlp_lr_scale < 0:
        raise ValueError(f"--mlp-lr-scale {cfg.mlp_lr_scale}: use a share of at least 0 (0: MLP weights frozen)")
    if cfg.repr_align and cfg.family != "dream":
        raise ValueError(f"--repr-align aligns a Dream model's layers to the AR model it is adapted from "
                         f"(shifted logits: the same position predicts the same token); family "
                         f"{cfg.family!r} is not adapted that way (use --family dream)")
    if cfg.repr_align and cfg.compile:
        raise ValueError("--repr-align reads the student's hidden states through Denoiser.execute, which "
                         "--compile does not compile (it compiles the model's forward): the run would train "
                         "uncompiled; drop one of the two")
    if cfg.probe_every < 0 or cfg.probe_n < 1:
        raise ValueError(f"--probe-every {cfg.probe_every} --probe-n {cfg.probe_n}: use a step count "
                         "of at least 0 (0: never) and at least 1 problem per task")
    for t in cfg.probe_tasks:
        get_task(t)                     # an unknown task fails here, not at the first reading
    for key, what in (("end_rows", "places masked-diffusion rows' block at the answer's end"),
                      ("frontier_rows", "masks masked-diffusion rows from a frontier on")):
        share, flag = getattr(cfg, key), "--" + key.replace("_", "-")
        if not 0 <= share <= 1:
            raise ValueError(f"{flag} {share}: a share of the rows, between 0 and 1")
        if share and cfg.family not in ("llada", "dream"):
            raise ValueError(f"{flag} {what}; family {cfg.family!r} has no such rows (use llada or dream)")
    if cfg.family in BLOCK_FAMILIES:
        if cfg.block_size < 1 or any(b < 1 for b in cfg.block_sizes):
            raise ValueError(f"--block-size {cfg.block_size} / --block-sizes {cfg.block_sizes}: block sizes of "
                             "at least 1")
        if tuple(cfg.mask_mix) != (1.0, 0.0, 0.0) or cfg.full_mask:
            raise ValueError(f"--mask-mix / --full-mask choose masked-diffusion rows; family {cfg.family!r} "
                             "masks each block by its own scheme (use llada or dream)")
    if cfg.fit_canvas and cfg.family not in BLOCK_FAMILIES:
        raise ValueError(f"--fit-canvas fits each batch's canvas to its answers for a block-causal decoder, which "
                         f"stops at the block holding EOS; a {cfg.family!r} model "
                         + ("pads nothing" if cfg.family == "ar" else "fills a whole generation canvas")
                         + " (use --family sdar or fast_dllm_v2)")
    if cfg.loss_weight == "cart" and not 0 < cfg.cart_p < 1:
        raise ValueError(f"--cart-p {cfg.cart_p}: the geometric decay must lie strictly between 0 and 1")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_shares(flag: str, values, count: int | None = None, what: str = "") -> None:
    """Sampling odds: `count` of them when given, none negative, not all zero."""
    if count is not None and len(values) != count:
        raise ValueError(f"{flag} has {len(values)} entries{what}")
    if any(not v >= 0 for v in values) or not sum(values) > 0:
        raise ValueError(f"{flag} {','.join(map(str, values))}: odds of at least 0, not all 0")


def _check_values(cfg: TrainConfig) -> None:
    """Refuse values no run can use (a negative step count, odds that sum to nothing, a head count
    that does not divide the width, an unknown task), naming the flag: else they fail mid-run with
    a traceback, or train something other than what was asked without a word."""
    for key, low in (("steps", 0), ("batch_size", 1), ("log_every", 1), ("warmup", 0), ("checkpoint_every", 0),
                     ("threads", 0), ("d_model", 1), ("n_layers", 1), ("n_heads", 1), ("mlp_hidden", 1),
                     ("n_kv_heads", 0), ("max_length", 1), ("batch_tokens", 0)):
        if getattr(cfg, key) < low:
            raise ValueError(f"{_flag(key)} {getattr(cfg, key)}: use at least {low}")
    if cfg.stop_after is not None and cfg.stop_after < 0:
        raise ValueError(f"--stop-after {cfg.stop_after}: use a step count of at least 0")
    for key in ("lr", "checkpoint_minutes", "weight_decay", "grad_clip"):
        if not getattr(cfg, key) >= 0:
            raise ValueError(f"{_flag(key)} {getattr(cfg, key)}: use a value of at least 0")
    if not 0 <= cfg.full_mask <= 1:
        raise ValueError(f"--full-mask {cfg.full_mask}: a share of the rows, between 0 and 1")
    _check_shares("--mask-mix", cfg.mask_mix, 3, " (iid, block, eos)")
    if not cfg.canvas or any(c < 1 for c in cfg.canvas):
        raise ValueError(f"--canvas {','.join(map(str, cfg.canvas))}: lengths of at least 1")
    _check_shares("--canvas-weights", cfg.canvas_weights, len(cfg.canvas), f" for {len(cfg.canvas)} canvases")
    if not cfg.tasks:
        raise ValueError("--tasks: name at least one task")
    tasks = []
    for name in cfg.tasks:
        try:
            tasks.append(get_task(name))
        except KeyError as e:
            raise ValueError(f"--tasks: {e.args[0] if e.args else name}") from None
    if cfg.task_weights:
        _check_shares("--task-weights", cfg.task_weights, len(cfg.tasks),
                      f" for {len(cfg.tasks)} tasks ({', '.join(cfg.tasks)})")
    if cfg.task_groups and len(cfg.task_groups) != len(cfg.tasks):
        raise ValueError(f"--task-groups has {len(cfg.task_groups)} entries for {len(cfg.tasks)} tasks "
                         f"({', '.join(cfg.tasks)})")
    if cfg.task_groups and not cfg.batch_by_task:
        raise ValueError("--task-groups needs --batch-by-task")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"--n-heads {cfg.n_heads} does not divide --d-model {cfg.d_model}")
    # only a count given: the family's default (0) is what every model built so far used
    if cfg.n_kv_heads < 0 or (cfg.n_kv_heads and cfg.n_heads % cfg.n_kv_heads):
        raise ValueError(f"--n-kv-heads {cfg.n_kv_heads}: key/value heads must divide --n-heads {cfg.n_heads}")
    _check_fit(cfg, tasks)


LOCK = "train.lock"
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")   # a model folder's weights


def _check_out(out: Path, init: str | None) -> None:
    """Refuse an --out folder that already holds a run or a model: a mistaken --out must not replace
    either (--resume continues a run). The exception is --out naming the --init folder itself, a
    later stage trained in place (``_earlier_stages`` reads the base's logs before writing)."""
    if init is not None and out.exists() and out.resolve() == Path(init).resolve():
        return
    held = [n for n in (CHECKPOINT_NAME, "training.json", *MODEL_FILES) if (out / n).exists()]
    if held:
        raise ValueError(f"--out {out} already holds {held[0]} (a run or a model): choose another folder, "
                         f"or continue the run with --resume {out}")


class _Lock:
    """An exclusive lock on a run folder (flock on its train.lock), held while a process writes it:
    two processes writing one folder would interleave their logs and checkpoints. The kernel drops
    it when the process dies, so a killed run never leaves its folder locked."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise ValueError(f"{out} is in use by another process (PID {holder})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)        # the file stays (removing it would race a waiting locker)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _start(cfg: TrainConfig, state: dict | None = None) -> Run:
    """Build a run from scratch, or (with a checkpoint dict `state`) as that checkpoint left it.
    The order of seeding and construction is the order the first reference models were trained in."""
    check_config(cfg)           # first: a refused value (--threads -1 too) is one line, not a traceback
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _settle_vector_math()
    torch.manual_seed(cfg.seed)
    resumed = state is not None
    record = _init_record(cfg) if cfg.init and not resumed else None
    adapted_from = (state["extra"]["init"] if resumed else record) or {"config": {"family": None}}
    if cfg.repr_align and adapted_from["config"]["family"] != "ar":
        raise ValueError(f"--repr-align aligns to the AR model the run is adapted from: --init must name an "
                         f"AR checkpoint (got {cfg.init!r})")
    out = Path(cfg.out)
    if not resumed:
        _check_out(out, cfg.init)
    # every check above: a refused command has written nothing
    out.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out)
    try:
        run = _build_run(cfg, state, out, record)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def _build_run(cfg: TrainConfig, state: dict | None, out: Path, record: dict | None) -> Run:
    resumed = state is not None
    earlier = _earlier_stages(Path(cfg.init), record, out) if record is not None else None
    if resumed:     # the checkpoint holds the weights; --init need not exist any more (but see --repr-align)
        earlier = record = state["extra"]["init"]
    tok = save_char_tokenizer(out)
    model = build(cfg, tok, record, load_init=not resumed)
    batcher = Batcher(cfg, tok)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    canvas_rng = random.Random(f"canvas/{cfg.seed}")
    opt = optimizer(cfg, model)
    run = Run(cfg, out, tok, model, opt, batcher, gen, canvas_rng, earlier=earlier)
    if cfg.repr_align:
        run.teacher = _teacher(cfg, tok, record)
    if cfg.compile:
        run.compiled = compiled(model)
    if resumed:
        run.progress = restore(state, model, opt, batcher, gen, canvas_rng)
    return run


# a layer's MLP matrices: Llama / Qwen2 / SDAR (layers.N.mlp.*) and LLaDA (blocks.N.ff_proj / up_proj /
# ff_out; its output head, transformer.ff_out, sits outside the blocks)
MLP_WEIGHT = re.compile(r"\.(layers|blocks)\.\d+\.(mlp\.|ff_proj\.|up_proj\.|ff_out\.)")


def optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, weight decay on the matrices only. With ``mlp_lr_scale`` other than 1 the MLP
    matrices form a third group whose rate is that share of the schedule's (``lr_scale``):
    layer-specific rates, one of the choices Radical Numerics' RND1 report studies for converting an
    AR model. The bet here: the AR model's arithmetic lives largely in its MLP weights, while the
    attention is what the move to bidirectional masks has to change."""
    split = cfg.mlp_lr_scale != 1.0       # without it the groups, and so old checkpoints' states, stay as they were
    mlp = [p for n, p in model.named_parameters() if p.dim() >= 2 and MLP_WEIGHT.search(n)] if split else []
    seen = {id(p) for p in mlp}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in seen]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if split:
        groups.append({"params": mlp, "weight_decay": cfg.weight_decay, "lr_scale": cfg.mlp_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _next_batch(run: Run) -> tuple[Tensor, Tensor, int]:
    cfg = run.cfg
    if cfg.batch_by_task:
        return run.batcher.task_batch(run.canvas_rng)
    if cfg.family == "ar":
        return run.batcher.next(None)
    G = None if cfg.fit_canvas else run.canvas_rng.choices(cfg.canvas, weights=cfg.canvas_weights)[0]
    return run.batcher.next(G)


def batch_loss(cfg: TrainConfig, model, tok, ids: Tensor, att: Tensor, P: int, step: int,
               gen: torch.Generator, rng: random.Random, teacher=None) -> Tensor:
    """The loss `cfg` trains on for batch ids / att (B, L) with P prompt positions at schedule step
    `step`, under the run's autocast: the forward of a training step (``_step``, and
    ``tools.step_time``, which times it). `gen` draws the masks, `rng` the block size (``block_sizes``)."""
    with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
        if cfg.family == "ar":
            return ar_loss(model, ids, att, P)
        if cfg.family in BLOCK_FAMILIES:
            # no draw without --block-sizes, so single-size runs keep their data stream
            size = rng.choice(cfg.block_sizes) if cfg.block_sizes else cfg.block_size
            loss = block_diffusion_loss if cfg.family == "sdar" else shifted_block_diffusion_loss
            return loss(model, ids, att, P, tok.mask_token_id, cfg.eps, gen, size)
        attend = anneal_attend(att, step, cfg.attention_anneal, cfg.seed)              # None: full attention
        return diffusion_loss(model, ids, att, P, tok.mask_token_id, tok.eos_token_id, cfg.eps, gen,
                              cfg.mask_mix, cfg.full_mask, cfg.loss_weight, cfg.cart_p, attend, teacher,
                              cfg.repr_align, cfg.end_rows, cfg.frontier_rows)


def apply_gradients(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """Backward, clip, AdamW: the rest of a training step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


def _step(run: Run, step: int) -> float:
    """One optimizer step of the schedule -> its loss."""
    cfg = run.cfg
    ids, att, P = _next_batch(run)
    ids, att = ids.to(cfg.device), att.to(cfg.device)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(cfg, step) * group.get("lr_scale", 1.0)
    model = run.model if run.compiled is None else run.compiled
    loss = batch_loss(cfg, model, run.tok, ids, att, P, step, run.gen, run.canvas_rng, run.teacher)
    apply_gradients(cfg, run.model, run.opt, loss)
    return float(loss.detach())


RUN_LOGS = ("loss_log.jsonl", "probe_log.jsonl")   # written as a run goes, past its checkpoints


def _covered(path: Path, step: int) -> list[dict]:
    """The lines of run log `path` that a checkpoint at `step` covers: a loss line's ``step`` is
    the step it logs (those before `step`), a reading's ``steps`` the steps done when it was taken
    (those up to `step`)."""
    return [x for x in _read_log(path) if (x["steps"] <= step if "steps" in x else x["step"] < step)]


def _write_log(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _open_log(run: Run, name: str = "loss_log.jsonl"):
    """A log of the run (loss_log.jsonl by default), written as it goes so a long run can be
    watched; a resumed run keeps the lines its checkpoint covers and drops any logged after it."""
    path = run.out / name
    if run.progress.step == 0:
        return path.open("w")
    _write_log(path, _covered(path, run.progress.step) if path.exists() else [])
    return path.open("a")


def _probe(run: Run, log_file) -> None:
    """One line per task in probe_log.jsonl: the left-to-right reading (tools.probe) of the
    weights after `steps` optimizer steps, in float32 without autocast, as ``tools.probe`` reads a
    snapshot. It draws no random numbers, so the run's weights are those of a run without it."""
    from dllm_decode.tools.probe import read_model

    cfg = run.cfg
    tasks = list(cfg.probe_tasks or dict.fromkeys(cfg.tasks))
    gen_length = min(cfg.canvas)        # a diffusion model reads at the run's shortest canvas
    for task in tasks:                  # a line per task as it is read: a reading can take minutes
        r, = read_model(run.model, run.tok, [task], cfg.probe_n, gen_length=gen_length)
        log_file.write(json.dumps({"steps": run.progress.step, "task": r.task, "n": r.n,
                                   "nats_per_char": round(r.nats_per_char, 5),
                                   "wrong_share": round(r.wrong_share, 5), "whole": r.whole}) + "\n")
        log_file.flush()


class _Interrupt:
    """SIGTERM / SIGINT set a flag the loop reads after the current step, so an interrupted run
    writes a checkpoint instead of losing the steps since the last one."""

    def __init__(self) -> None:
        self.signum: int | None = None        # the signal that stopped the run, if one did
        self.saved = {}

    @property
    def hit(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _loop(run: Run, progress: bool, interrupt: _Interrupt) -> None:
    """Run the schedule from the run's position to its end or `stop_after`; a run that stops
    before the end of its schedule (stop_after, a signal: `interrupt.hit`) writes a checkpoint."""
    cfg, p = run.cfg, run.progress
    n_steps = cfg.last_step()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_steps, initial=p.step, desc=f"train {cfg.family}", unit="step")
    t0 = last_save = time.perf_counter()

    def probe() -> None:            # its time is not training time: t0 moves past it
        nonlocal t0
        start = time.perf_counter()
        _probe(run, probes)
        t0 += time.perf_counter() - start

    with _open_log(run) as log_file, \
            (_open_log(run, "probe_log.jsonl") if cfg.probe_every else nullcontext()) as probes:
        if probes is not None and p.step == 0:
            probe()
        while p.step < n_steps and not interrupt.hit:
            step = p.step
            val = _step(run, step)
            p.running = val if p.running is None else 0.95 * p.running + 0.05 * val
            p.step += 1
            if step % cfg.log_every == 0 or step == cfg.steps - 1:   # same lines whatever stop_after
                log_file.write(json.dumps({"step": step, "loss": round(val, 5), "smoothed": round(p.running, 5),
                                           "lr": round(lr_at(cfg, step), 7),
                                           "seconds": round(p.elapsed + time.perf_counter() - t0, 1)}) + "\n")
                log_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{p.running:.4f}")
            if probes is not None and (p.step % cfg.probe_every == 0 or p.step == cfg.steps):
                probe()
            due = (cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0) or \
                (cfg.checkpoint_minutes and time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes)
            if due and p.step < cfg.steps:
                p.elapsed, t0 = p.elapsed + time.perf_counter() - t0, time.perf_counter()
                run.checkpoint()
                last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    p.elapsed += time.perf_counter() - t0
    if p.step < cfg.steps:
        run.checkpoint()


def _write_model(model: torch.nn.Module, out: Path, cfg: TrainConfig, meta: dict, earlier: dict | None) -> None:
    """Weights (the family's checkpoint format) and training.json of a model folder."""
    model.eval().requires_grad_(False)
    if cfg.family == "ar":
        model.save_pretrained(str(out))
    else:
        from dllm_decode.models import save_pretrained
        save_pretrained(model, out)
    meta = {"config": asdict(cfg), **meta, "torch": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters())}
    if torch.device(cfg.device).type == "cuda" and torch.cuda.is_available():   # the card names the accelerator
        meta["device_name"] = torch.cuda.get_device_name(torch.device(cfg.device))
    if earlier is not None:
        meta["init"] = earlier
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def _save_final(run: Run) -> None:
    _write_model(run.model, run.out, run.cfg, {"seconds": round(run.progress.elapsed, 1),
                                               "threads": torch.get_num_threads()}, run.earlier)


def snapshot(run_dir: str | Path, out: str | Path) -> Path:
    """The weights of run folder `run_dir`'s checkpoint.pt as a model folder `out` (weights,
    tokenizer, training.json with the step it was taken at), loadable like a finished run's, so a
    run can be evaluated part-way (e.g. ``python -m dllm_decode.tools.model_card OUT``) or
    started from (``--init OUT``: its loss log up to the checkpoint, and any earlier stage's, come
    along for the reproduction check; so do its --probe-every readings up to the checkpoint). The
    run itself is not touched."""
    state = read_checkpoint(Path(run_dir), "--snapshot")
    out = Path(out)
    if out.resolve() == Path(run_dir).resolve():
        raise ValueError(f"--snapshot {run_dir}: write the snapshot to another folder (--out)")
    # a snapshot may refresh an earlier snapshot of the same run, never replace another model or run
    old = out / "training.json"
    if (out / CHECKPOINT_NAME).exists() or (any((out / n).exists() for n in MODEL_FILES) and not (
            old.exists() and json.loads(old.read_text()).get("snapshot", {}).get("run") == str(run_dir))):
        raise ValueError(f"--out {out} already holds a run or a model; --snapshot writes to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(**{**state["config"], "out": str(out)})
    tok = save_char_tokenizer(out)
    earlier = state["extra"].get("init")
    # on the CPU whatever the run trained on: a snapshot only copies weights, and a run trained on
    # a GPU can be snapshotted on a machine without one
    model = build(replace(cfg, device="cpu"), tok, earlier, load_init=False)
    model.load_state_dict(state["model"])
    step = state["progress"]["step"]
    _write_model(model, out, cfg, {"snapshot": {"run": str(run_dir), "step": step}}, earlier)
    for log in [*Path(run_dir).glob("loss_log*.jsonl"), *Path(run_dir).glob("probe_log.jsonl")]:
        # a run logs past its last checkpoint; earlier stages' logs are whole
        _write_log(out / log.name, _covered(log, step) if log.name in RUN_LOGS else _read_log(log))
    return out


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train from scratch (or from `cfg.init`) -> the output folder. A run stopped early by
    `stop_after` also writes its weights and training.json, as a finished one does."""
    return _finish(_start(cfg), progress)


def resume(out: str | Path, stop_after: int | None = None, progress: bool = True) -> Path:
    """Continue the run whose checkpoint.pt is in `out` (its own config, seed and threads) to the
    end of its schedule, or to step `stop_after` -> the output folder."""
    return _finish(_resumed(out, stop_after), progress)


def _plain(config: dict) -> dict:
    """A config as JSON holds it (tuples as lists), without what differs between the pieces of a resumed run."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in ("out", "stop_after")}


def _resumed(out: str | Path, stop_after: int | None) -> Run:
    state = read_checkpoint(Path(out))
    # a finished run keeps its last periodic checkpoint; resuming from it would retrain the end of
    # the schedule over the finished weights. training.json says the run finished when it is this
    # run's (same config: not an earlier stage trained in place) and that piece reached the end;
    # a finished run whose weights were removed may be resumed from that checkpoint to rewrite them.
    meta_path = Path(out) / "training.json"
    if meta_path.exists() and any((Path(out) / n).exists() for n in MODEL_FILES):
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise ValueError(f"--resume {out}: {meta_path} is not JSON") from None
        done = meta.get("config", {})
        if "snapshot" not in meta and _plain(done) == _plain(state["config"]) and \
                (done.get("stop_after") is None or done["stop_after"] >= done["steps"]):
            raise ValueError(f"--resume {out}: the run already finished at step {done['steps']}")
    # checked before _start writes anything (or takes the folder's lock)
    if stop_after is not None and stop_after < state["progress"]["step"]:
        raise ValueError(f"--stop-after {stop_after}: {out} is already at step {state['progress']['step']}")
    cfg = TrainConfig(**{**state["config"], "out": str(out), "stop_after": stop_after})
    return _start(cfg, state)


def _finish(run: Run, progress: bool) -> Path:
    """Run the loop; weights and training.json once the schedule (or stop_after) is reached,
    not when a signal stopped it (its checkpoint is then the run's record: `run.stopped_by`)."""
    cfg = run.cfg
    # a signal during the final save waits for it: the weights alone, without their training.json,
    # would be a folder that loads and says nothing of how it was trained
    try:
        with _Interrupt() as interrupt:
            _loop(run, progress, interrupt)
            if run.progress.step == cfg.last_step():
                _save_final(run)
        run.stopped_by = interrupt.signum if run.progress.step < cfg.last_step() else None
    finally:
        if run.lock is not None:
            run.lock.release()
    return run.out


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
    # paired by step, not by line: a rerun logging every 2nd step (or a shipped log that did) still
    # lines up with the other's lines of the same steps
    theirs = {b["step"]: b for b in _read_log(log)}
    shared = [a for a in ours if a["step"] in theirs]
    if not shared:
        return 0, f"no step of {run / 'loss_log.jsonl'} is in {log}: nothing to compare"
    for n, a in enumerate(shared):
        b = theirs[a["step"]]
        if a["lr"] != b["lr"] or abs(a["loss"] - b["loss"]) > rel * abs(b["loss"]):
            return n, (f"step {a['step']}: loss {a['loss']} lr {a['lr']} here, "
                       f"loss {b['loss']} lr {b['lr']} in {log}")
    return len(shared), None


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description="Train a reference model on the task suite.")
    ap.add_argument("--family", choices=FAMILIES, default=d.family)
    ap.add_argument("--block-size", type=int, default=d.block_size,
                    help="sdar, fast_dllm_v2: the checkpoint's block size")
    ap.add_argument("--block-sizes", default=None, help="sdar, fast_dllm_v2: block sizes to train at, "
                    "comma-separated, one drawn per batch (default: --block-size, the checkpoint's own)")
    ap.add_argument("--out", help="output folder (required unless --resume)")
    ap.add_argument("--tasks", default=",".join(d.tasks), help="task names, comma-separated, or a "
                    f"named mix ({', '.join(MIXES)})")
    ap.add_argument("--task-weights", default=None, help="sampling odds of the tasks, comma-separated "
                    "(default: equal)")
    for name in ("steps", "batch_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "seed",
                 "threads", "warmup", "n_kv_heads", "max_length", "batch_tokens", "checkpoint_every",
                 "log_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--mlp-lr-scale", type=float, default=d.mlp_lr_scale, metavar="S",
                    help="the MLP weights' rate as a share S of the schedule's (0: frozen), to adapt an AR "
                    "model's attention faster than the MLP weights that hold much of what it computes")
    ap.add_argument("--canvas", default=",".join(map(str, d.canvas)),
                    help="generation lengths to train at, sampled per batch")
    ap.add_argument("--canvas-weights", default=None, help="sampling odds of the canvases (default: "
                    "6,2.5,1.5 for the default canvases, else equal)")
    ap.add_argument("--fit-canvas", action="store_true", help="sdar / fast_dllm_v2: each batch's canvas ends "
                    "at the block holding its longest answer's EOS instead of a drawn --canvas (which then "
                    "only bounds the answers and sets the probe's length)")
    ap.add_argument("--mask-mix", default=",".join(map(str, d.mask_mix)),
                    help="probabilities of iid / block / eos masking rows (see mask_canvas)")
    ap.add_argument("--full-mask", type=float, default=d.full_mask,
                    help="share of rows whose whole answer is masked (see mask_canvas)")
    ap.add_argument("--end-rows", type=float, default=d.end_rows, metavar="F",
                    help="llada/dream: share of rows whose semi-autoregressive block sits at the answer's "
                    "end, where decoding writes the final line and stops (see mask_canvas; 0: off)")
    ap.add_argument("--frontier-rows", type=float, default=d.frontier_rows, metavar="F",
                    help="llada/dream: share of rows revealed up to a uniform frontier and masked from it "
                    "on, the state of a left-to-right decode (see mask_canvas; 0: off)")
    ap.add_argument("--loss-weight", choices=("mdlm", "cart"), default=d.loss_weight,
                    help="llada/dream: weigh masked tokens by 1/t per row (mdlm, LLaDA's) or by their "
                    "revealed neighbours (cart, Dream's; see cart_weight)")
    ap.add_argument("--cart-p", type=float, default=d.cart_p,
                    help="with --loss-weight cart: the geometric decay with distance (0 < p < 1)")
    ap.add_argument("--attention-anneal", type=int, default=d.attention_anneal, metavar="N",
                    help="llada/dream from an AR --init: attend causally plus a share (s+1)/N of the other "
                    "pairs at step s, full attention from step N-1 on (DiffuLLaMA's annealing; 0: off)")
    ap.add_argument("--repr-align", type=float, default=d.repr_align, metavar="W",
                    help="dream from an AR --init: add W x (1 - cosine) between every layer's hidden states and "
                    "the frozen AR model's, where a masked token's loss is read (REPR-ALIGN; 0: off; not with "
                    "--compile)")
    ap.add_argument("--init", metavar="DIR", help="start from this checkpoint (same size, written by "
                    "this script; same family, or an AR one for llada/dream/sdar/fast_dllm_v2) instead of "
                    "random weights")
    ap.add_argument("--autocast", choices=("none", "bf16"), default=d.autocast,
                    help="run forward and loss under bfloat16 autocast (weights stay float32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model: fused kernels, "
                    "the same math rounded differently (a run's loss log then matches an uncompiled "
                    "rerun only to --check's tolerance)")
    ap.add_argument("--batch-by-task", action="store_true", help="draw one task per batch")
    ap.add_argument("--task-groups", default=None, help="with --batch-by-task: a group id per task, "
                    "comma-separated (e.g. 0,0,0,0,1); a batch then draws one group and mixes its tasks "
                    "row by row, with the task odds")
    ap.add_argument("--probe-every", type=int, default=d.probe_every, metavar="N",
                    help="read held-out problems left to right (tools.probe) before the first step, every "
                    "N steps and at the end, into probe_log.jsonl (0: never)")
    ap.add_argument("--probe-n", type=int, default=d.probe_n, help="with --probe-every: problems per task")
    ap.add_argument("--probe-tasks", default=None, help="with --probe-every: tasks to read, comma-"
                    "separated, or a named mix (default: the run's)")
    ap.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes,
                    help="also write checkpoint.pt every M minutes")
    ap.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint.pt, "
                    "with its own configuration (flags other than --stop-after, --check and "
                    "--no-progress are not used)")
    ap.add_argument("--snapshot", metavar="RUN_DIR", help="write the weights of RUN_DIR's checkpoint.pt "
                    "as a loadable model folder --out (to evaluate a run part-way), then exit")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after the first N steps of the schedule (writing a checkpoint to "
                         "--resume from); its loss_log.jsonl must then match the first lines of a "
                         "full run's (see --check)")
    ap.add_argument("--check", metavar="DIR", help="after training, compare the loss log with DIR's "
                    "(a shipped checkpoint trained by the same command); exit 1 on a mismatch")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated numbers") from None


def _task_names(text: str, flag: str) -> tuple[str, ...]:
    try:
        return task_names(text)
    except KeyError as e:       # an unknown name: one line naming the flag, not a traceback
        raise SystemExit(f"train: {flag}: {e.args[0] if e.args else text}") from None


def _config(a: argparse.Namespace) -> TrainConfig:
    d = TrainConfig()
    canvas = tuple(int(c) for c in parse_floats(a.canvas, "--canvas"))
    if a.canvas_weights:
        weights = parse_floats(a.canvas_weights, "--canvas-weights")
        if len(weights) != len(canvas):
            raise SystemExit(f"--canvas-weights has {len(weights)} entries for {len(canvas)} canvases")
    else:
        weights = d.canvas_weights if canvas == d.canvas else tuple(1.0 for _ in canvas)
    tasks = _task_names(a.tasks, "--tasks")
    task_weights = parse_floats(a.task_weights, "--task-weights") if a.task_weights else ()
    groups = tuple(int(x) for x in parse_floats(a.task_groups, "--task-groups")) if a.task_groups else ()
    return TrainConfig(family=a.family, out=a.out, tasks=tasks, task_weights=task_weights, steps=a.steps,
                       batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, d_model=a.d_model,
                       n_layers=a.n_layers, n_heads=a.n_heads, mlp_hidden=a.mlp_hidden, canvas=canvas,
                       canvas_weights=weights, fit_canvas=a.fit_canvas, seed=a.seed, threads=a.threads, device=a.device,
                       mask_mix=parse_floats(a.mask_mix, "--mask-mix"), full_mask=a.full_mask, end_rows=a.end_rows,
                       frontier_rows=a.frontier_rows,
                       loss_weight=a.loss_weight, cart_p=a.cart_p, attention_anneal=a.attention_anneal,
                       repr_align=a.repr_align, mlp_lr_scale=a.mlp_lr_scale,
                       stop_after=a.stop_after, init=a.init, n_kv_heads=a.n_kv_heads,
                       max_length=a.max_length, autocast=a.autocast, compile=a.compile, batch_by_task=a.batch_by_task,
                       batch_tokens=a.batch_tokens, task_groups=groups, checkpoint_every=a.checkpoint_every,
                       checkpoint_minutes=a.checkpoint_minutes, log_every=a.log_every, block_size=a.block_size,
                       probe_every=a.probe_every, probe_n=a.probe_n,
                       probe_tasks=_task_names(a.probe_tasks, "--probe-tasks") if a.probe_tasks else (),
                       block_sizes=(tuple(int(x) for x in parse_floats(a.block_sizes, "--block-sizes"))
                                    if a.block_sizes else ()))


RESUME_FLAGS = ("resume", "stop_after", "check", "no_progress")   # what --resume takes from the command line


def _check_resume_flags(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--resume runs the checkpoint's own configuration: any other flag given would be silently
    ignored, so a command that sets one (--steps 10, --lr 0.5) is refused, naming them."""
    ignored = [_flag(k) for k, v in vars(a).items()
               if k not in RESUME_FLAGS and v != ap.get_default(k)]
    if ignored:
        raise ValueError(f"--resume {a.resume} continues the run with its own configuration; "
                         f"{', '.join(ignored)} would be ignored (only --stop-after, --check and "
                         "--no-progress combine with --resume)")


def _check_reference(check: str) -> None:
    """--check DIR before training: a missing or unreadable DIR should not cost the run first."""
    for name in ("training.json", "loss_log.jsonl"):
        path = Path(check) / name
        if not path.exists():
            raise FileNotFoundError(f"--check {check}: no {name} (a checkpoint written by this script)")
        try:
            json.loads(path.read_text()) if name.endswith(".json") else _read_log(path)
        except ValueError:
            raise ValueError(f"--check {check}: {path} is not valid JSON") from None


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    a = ap.parse_args(argv)
    try:        # a refused configuration or checkpoint is one line; an error while training is not
        if a.snapshot:
            if not a.out:
                raise SystemExit("train --snapshot RUN_DIR needs --out DIR")
            print(snapshot(a.snapshot, a.out))
            return
        if not a.resume and not a.out:
            raise SystemExit("train: --out DIR is required (or --resume DIR)")
        if a.check:
            _check_reference(a.check)
        if a.resume:
            _check_resume_flags(ap, a)
        run = _resumed(a.resume, a.stop_after) if a.resume else _start(_config(a))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train: {e}") from None
    out = _finish(run, progress=not a.no_progress)
    if run.stopped_by is not None:
        # not 0: `train ... && model_card ...` must not go on as if the run had finished
        print(f"train: stopped by {signal.Signals(run.stopped_by).name} at step {run.progress.step} of "
              f"{run.cfg.steps}; checkpoint in {out}; continue with: "
              f"python -m dllm_decode.tools.train --resume {out}", file=sys.stderr)
        raise SystemExit(128 + run.stopped_by)
    print(out)
    if a.check:
        n, mismatch = check_log(out, Path(a.check))
        if mismatch:
            raise SystemExit(f"loss log differs from {a.check}'s: {mismatch}")
        print(f"loss log matches {a.check}'s over its first {n} lines")


if __name__ == "__main__":
    main()

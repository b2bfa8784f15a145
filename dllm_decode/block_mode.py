"""Block-by-block requests for block-causal models (SDAR, Fast-dLLM v2, LLaDA2).

A block-causal model (``ModelSpec.block_size``) attends causally across blocks of ``size``
positions and bidirectionally inside one; a block is counted from each row's first real token
(RoPE position // size), so with left padding a row's blocks start at its own column
``origin = gen_start - prompt_length``. The engine decodes such a model the way the official
loops do (JetAstra/SDAR ``generate.py``, ``block_diffusion_generate``):

- a row's canvas starts with the masks of its first block only: the block holding the prompt's
  last position is completed (``size - prompt_length % size`` masks, 1 to ``size``);
- after the step that commits a row's last mask, the row grows by one masked block
  (``Resize(append=size)``, :mod:`dllm_decode.canvas`), unless its generated text holds a stop
  id (native variable length: it stops at the block where EOS appears, per row in a padded batch)
  or it reached its length, ``ceil((prompt_length + gen_length) / size) * size`` positions as in
  the official loop (and never past the model's ``max_length``);
- columns never move, so the request's cache stores are widened, not cleared: K/V a cache wrote
  for finished blocks stay valid (``caches/block_kv.py`` is the exact cache built on that).

Inside the current block every slot works as on a bidirectional model. Spans that count blocks
(``dllm_decode.blocks.current_block``) count them from ``origin``, so ``generation.block_length``
must divide the model's block size (a sub-block, as Fast-dLLM v2's ``small_block_size``). Plugins
must follow a canvas that grows between their calls (``PluginMeta.resizable``), and no canvas
rule (``resize_canvas``) may move columns: both are refused when the recipe meets the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dllm_decode.state import DecodeState, Resize


@dataclass(frozen=True)
class BlockLayout:
    """How a request's rows are cut into the model's blocks."""

    size: int                 # the model's block size
    origin: torch.Tensor      # (B,) long: each row's first real column (RoPE position 0)
    limit: torch.Tensor       # (B,) long: the column a row may grow to (exclusive)


def first_ends(prompt_lengths: list[int], gen_length: int, size: int,
               max_length: int | None) -> tuple[list[int], list[int]]:
    """Per row: the generated positions of its first block, and the most it may generate."""
    first, most = [], []
    for p in prompt_lengths:
        total = -(-(p + gen_length) // size) * size                  # whole blocks, as the official loop
        if max_length is not None:
            total = min(total, max_length)
        most.append(total - p)
        first.append(min(size - p % size, total - p))
    return first, most


def layout(prompt_lengths: list[int], gen_start: int, gen_length: int, size: int, max_length: int | None,
           device: torch.device) -> tuple[BlockLayout, list[int]]:
    """The request's ``BlockLayout`` and each row's first canvas end."""
    first, most = first_ends(prompt_lengths, gen_length, size, max_length)
    lengths = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
    origin = gen_start - lengths
    limit = gen_start + torch.tensor(most, dtype=torch.long, device=device)
    return BlockLayout(size=size, origin=origin, limit=limit), [gen_start + n for n in first]


def origin(state: DecodeState) -> torch.Tensor:
    """(B,) long: the column span blocks are counted from: each row's first real column with a
    block-causal model (the model's blocks), else ``gen_start``."""
    if state.blocks is not None:
        return state.blocks.origin
    return state.constant("block_origin", lambda: torch.full((state.batch_size,), state.gen_start,
                                                               dtype=torch.long, device=state.device))


def block_start(state: DecodeState, cols: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) long: the first column of the block of ``size`` positions, counted from ``origin``,
    that holds each row's column ``cols`` (B,)."""
    o = origin(state)
    return o + (cols - o).div(size, rounding_mode="floor") * size


def block_starts(state: DecodeState) -> torch.Tensor:
    """(B, L) bool: the masked columns that open one of the model's blocks after a row's first
    one (``(column - origin) % size == 0``). Rows hold masks in their current block only, so a
    row has at most one, and only before the step that commits it. With the token shift
    (Fast-dLLM v2) its logit is the previous block's last output."""
    blocks: BlockLayout = state.blocks
    rel = state.columns[None, :] - blocks.origin[:, None]                     # (B, L)
    return state.masked & (rel > 0) & (rel % blocks.size == 0)


def growth(state: DecodeState, active: torch.Tensor) -> Resize:
    """The next block for every row that finished its block this step and goes on (see the
    module doc); appends of 0 elsewhere. Batched, no host read (the canvas applies it)."""
    blocks: BlockLayout = state.blocks
    complete = active & ~state.masked.any(dim=1)                                  # (B,)
    generated = (state.columns >= state.gen_start) & (state.columns < state.ends[:, None])
    stopped = (torch.isin(state.x, state.eos_ids) & generated).any(dim=1) if state.eos_ids.numel() \
        else torch.zeros_like(complete)
    room = (blocks.limit - state.ends).clamp(min=0)                               # (B,)
    grow = complete & ~stopped
    return Resize(append=torch.where(grow, torch.minimum(room, torch.full_like(room, blocks.size)), 0))


def problems(recipe: Any, policy: Any, size: int) -> list[str]:
    """What a recipe cannot do on a block-causal model, each naming the key or plugin."""
    where = recipe.source or "<recipe>"
    found = []
    gen = recipe.generation
    if size % gen.block:
        found.append(f"{where}: generation.block_length is {gen.block}, but the block-causal model decodes "
                     f"one block of {size} positions at a time; set block_length to {size} or a divisor of it")
    if "resize_canvas" in policy.slots:
        found.append(f"{where}: resize_canvas: plugin {policy.plugin_for('resize_canvas')!r} moves columns, "
                     f"but a block-causal model's canvas grows one block of {size} at a time at its end")
    for slot, bound in policy.slots.items():
        if not policy.metas[bound.plugin_name].resizable:
            found.append(f"{where}: {slot}: plugin {bound.plugin_name!r} does not declare that it follows a "
                         "canvas that grows during a request (PluginMeta.resizable); a block-causal model's "
                         f"canvas grows one block of {size} at a time; choose another plugin")
    return found

"""What one denoiser forward hands the engine."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["ForwardOutput"]


@dataclass
class ForwardOutput:
    """The result of executing one compute plan.

    logits[:, j] predicts canvas position positions[:, j] (aligned for every family; positions
    None: column j, the whole canvas). shadow_logits are the plan's extra verification queries
    (ComputePlan.shadow, WINO): column j predicts canvas position plan.shadow[:, j] without
    seeing the token there. attention: with ComputePlan.attention, every layer's attention
    probabilities averaged over the heads, (B, f, K) per layer (rows: the fed positions, columns:
    the key positions; see the plan's `attention`). hidden: with ComputePlan.hidden, the residual
    stream after every layer, (B, f, d) per layer, before the final norm."""
    logits: Tensor                        # (B, q, V)
    positions: Tensor | None = None       # (B, q) long canvas positions, None = all L columns
    shadow_logits: Tensor | None = None   # (B, S, V)
    attention: tuple[Tensor, ...] | None = None   # per layer (B, f, K)
    hidden: tuple[Tensor, ...] | None = None      # per layer (B, f, d)

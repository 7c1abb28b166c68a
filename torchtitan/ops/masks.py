"""Which keys a query may see, defined by token positions (so a shard with global positions uses it as is)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from torchtitan.tools.errors import ConfigError

MASK_KINDS = ("causal", "sliding_window")


@dataclass(frozen=True)
class AttentionMask:
    """Which keys a query sees. causal: every key at or before its position; sliding_window: only the
    `window` most recent of those (itself included)."""

    kind: str = "causal"
    window: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ConfigError(f"attention mask kind {self.kind!r} is not one of {', '.join(MASK_KINDS)}")
        if (self.kind == "sliding_window") != (self.window is not None and self.window >= 1):
            raise ConfigError(f"attention mask {self.kind}: a window >= 1 goes with sliding_window only "
                              f"(got window={self.window})")

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(B, 1, Sq, Sk) booleans from (B, Sq) query and (B, Sk) key positions."""
        q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
        ok = k <= q
        if self.kind == "sliding_window":
            ok = ok & (q - k < self.window)
        return ok


CAUSAL = AttentionMask()

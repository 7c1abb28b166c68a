"""HF <-> native weight names as a table, plus the few real transforms written once."""
from __future__ import annotations

import re

import torch


def permute_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k from Meta's interleaved-pair RoPE layout to HF's rotate-half layout."""
    out_dim, in_dim = w.shape[0], w.shape[1:]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *in_dim).transpose(1, 2).reshape(out_dim, *in_dim)


def permute_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_to_rotate_half."""
    out_dim, in_dim = w.shape[0], w.shape[1:]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *in_dim).transpose(1, 2).reshape(out_dim, *in_dim)


class TableAdapter:
    """Renames by regex table (`{}` is the layer index); subclasses add value transforms."""

    to_hf_table: dict[str, str] = {}

    def __init__(self, model_args):
        self.args = model_args
        self._to_hf = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in self.to_hf_table.items()]
        self._from_hf = [(re.compile("^" + re.escape(v).replace(r"\{\}", r"(\d+)") + "$"), k) for k, v in self.to_hf_table.items()]

    @staticmethod
    def _rename(key: str, table) -> str | None:
        for pattern, target in table:
            m = pattern.match(key)
            if m:
                return target.replace("{}", m.group(1)) if m.groups() else target
        return None

    def hf_key(self, key: str) -> str:
        out = self._rename(key, self._to_hf)
        if out is None:
            raise KeyError(f"no HF name for parameter {key!r}")
        return out

    def native_key(self, hf_key: str) -> str | None:
        return self._rename(hf_key, self._from_hf)

    def transform_to_hf(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def transform_from_hf(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return value

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.hf_key(k): self.transform_to_hf(k, v) for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for hk, v in hf_state_dict.items():
            k = self.native_key(hk)
            if k is None:
                if hk.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some HF checkpoints carry
                raise KeyError(f"unexpected HF tensor {hk!r}")
            out[k] = self.transform_from_hf(k, v)
        return out

"""RMSNorm with a hand-written backward for eager float32 on CPU, torch's `F.rms_norm` everywhere else.

On CPU torch's rms_norm is a composite of elementwise ops (pow, mean, add, rsqrt and two multiplies forward,
about ten ops backward, each a full pass over the activation), and autograd keeps their intermediates. This
one makes one reduction and two passes forward, saves only the input and the (..., 1) inverse RMS, and forms
the input gradient in place: forward + backward on (8, 512, 256) float32 takes about half the time (see
docs/performance.md). The values agree with torch's to rounding (float32 sums in another order), not bitwise.

Everything else stays on `F.rms_norm`: CUDA has a fused kernel; DTensors (sequence-parallel norms) need
DTensor's own rule; under torch.compile inductor fuses the composite better than a custom Function; reduced
precision keeps torch's float32 accumulation exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


class _RMSNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow_(2).div_(x.shape[-1])
        rstd = sq.add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x_hat).sum(dim=tuple(range(grad.dim() - 1)))
        gw = grad * weight
        # d/dx of x_hat * w: rstd * (gw - x_hat * mean(gw * x_hat)), the mean over the normalized dim.
        coef = (gw * x_hat).mean(-1, keepdim=True)
        grad_x = gw.sub_(x_hat.mul_(coef)).mul_(rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None


def _fast_path(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return (weight is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not isinstance(x, DTensor) and not isinstance(weight, DTensor)
            and not torch.compiler.is_compiling())


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """RMS-normalize over the last dim and scale by `weight`; `eps` None means the dtype's epsilon, as torch."""
    if _fast_path(x, weight):
        return _RMSNormCPU.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm module (same parameter, same state dict) computed by `rms_norm` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)

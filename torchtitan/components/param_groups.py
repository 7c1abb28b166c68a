"""What each parameter is to the model, decided by the module holding it, and the optimizer groups built on that.

A parameter's role is read off its module's type, never off a name pattern:

- ``embedding``: the weight of an ``nn.Embedding`` (ours: ``Decoder.tok_embeddings``), and the output weight of a
  model that ties it to the embedding (under pipeline parallel the last stage holds a copy of the tied weight,
  which must step like the first stage's);
- ``norm``: weights and biases of a normalization layer (``NORM_CLASSES``);
- ``bias``: a bias of any other module (``nn.Linear.bias``, the grouped experts' ``b1``/``b2``/``b3``);
- ``output``: the output layer's weight (``model.output``, the lm head), a matrix like the others;
- ``router``: the weights of an MoE router (``models/common/moe.py`` ``Router``: its gate);
- ``matrix``: every other parameter of two or more dimensions (projections, stacked expert weights);
- ``other``: the remaining vectors (attention sinks).

AdamW's weight-decay groups (OLMo's ``decay_embeddings`` / ``decay_norm_and_bias``) are built from the roles here;
an optimizer that treats matrices apart (Muon: ``matrix`` on Muon, the other roles on AdamW) reads the same roles.
AdamW decays ``router`` and ``output`` like ``matrix``.
Roles are computed per model part (each pipeline stage has its own optimizer) and hold for any parameter the
module carries: plain tensors, FSDP2's DTensor shards, tensor-parallel DTensors.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import torch
from torch import nn

from torchtitan.distributed.tensor_parallel import HeadShardedRMSNorm
from torchtitan.models.common.layers import NonParametricLayerNorm, PlusOneRMSNorm
from torchtitan.models.common.moe import GroupedExperts, Router


class Role(str, enum.Enum):
    EMBEDDING = "embedding"
    NORM = "norm"
    BIAS = "bias"
    OUTPUT = "output"
    ROUTER = "router"
    MATRIX = "matrix"
    OTHER = "other"


NORM_CLASSES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.modules.instancenorm._InstanceNorm,
    NonParametricLayerNorm, PlusOneRMSNorm, HeadShardedRMSNorm)
# Modules whose biases are not called `bias`.
BIAS_NAMES: dict[type[nn.Module], tuple[str, ...]] = {GroupedExperts: ("b1", "b2", "b3")}


class ParamRole(NamedTuple):
    fqn: str
    param: nn.Parameter
    role: Role


def _role(module: nn.Module, name: str, param: torch.Tensor, output: nn.Module | None, tied: bool,
          routed: set[int]) -> Role:
    if id(param) in routed and param.ndim >= 2:
        return Role.ROUTER
    if isinstance(module, nn.Embedding):
        return Role.EMBEDDING
    if isinstance(module, NORM_CLASSES):
        return Role.NORM
    if name == "bias" or any(isinstance(module, cls) and name in names for cls, names in BIAS_NAMES.items()):
        return Role.BIAS
    if module is output and name == "weight":
        return Role.EMBEDDING if tied else Role.OUTPUT
    return Role.MATRIX if param.ndim >= 2 else Role.OTHER


def parameter_roles(model: nn.Module) -> list[ParamRole]:
    """Every distinct parameter of `model` (one model part) with its role, in `model.parameters()` order."""
    output = getattr(model, "output", None)
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():  # the first module holding a shared parameter owns it (a tied embedding)
        for name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, name))
    routed = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    return [ParamRole(fqn, p, _role(*owner[id(p)], p, output, tied, routed)) for fqn, p in model.named_parameters()]


def excluded_roles(decay_embeddings: bool, decay_norm_and_bias: bool) -> frozenset[Role]:
    """The roles that train without weight decay (OLMo's get_param_groups)."""
    return frozenset(([] if decay_embeddings else [Role.EMBEDDING])
                     + ([] if decay_norm_and_bias else [Role.NORM, Role.BIAS]))


def weight_decay_groups(model: nn.Module, weight_decay: float, excluded: frozenset[Role]) -> list[dict]:
    """Parameter groups of one model part: those of an `excluded` role get weight_decay 0. When nothing is
    excluded (or there is no decay) one group of every trainable parameter, as a plain parameter list gives."""
    roles = [r for r in parameter_roles(model) if r.param.requires_grad]
    no_decay = [r.param for r in roles if r.role in excluded]
    if not no_decay or weight_decay == 0:
        return [{"params": [r.param for r in roles]}]
    decay = [r.param for r in roles if r.role not in excluded]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def describe_groups(optimizers: list[torch.optim.Optimizer], weight_decay: float, excluded: frozenset[Role]) -> str:
    """One line: tensors and parameters with and without weight decay over this rank's model parts."""
    groups = [g for opt in optimizers for g in opt.param_groups]
    on = [p for g in groups if g["weight_decay"] == weight_decay for p in g["params"]]
    off = [p for g in groups if g["weight_decay"] != weight_decay for p in g["params"]]
    line = f"optimizer: weight decay {weight_decay:g} on {len(on)} tensors ({sum(p.numel() for p in on):,} parameters)"
    if not off:
        return line
    roles = ", ".join(r.value for r in Role if r in excluded)
    return f"{line}, none on {len(off)} tensors ({sum(p.numel() for p in off):,} parameters: {roles})"


def muon_groups(model: nn.Module, weight_decay: float, excluded: frozenset[Role]) -> list[dict]:
    """Muon's groups of one model part: the ``matrix`` role on Muon (weight decay on), every other role on
    AdamW, split by weight decay as weight_decay_groups does."""
    roles = [r for r in parameter_roles(model) if r.param.requires_grad]
    matrices = [r.param for r in roles if r.role is Role.MATRIX]
    rest = [r for r in roles if r.role is not Role.MATRIX]
    decay = [r.param for r in rest if r.role not in excluded or weight_decay == 0]
    no_decay = [r.param for r in rest if r.role in excluded and weight_decay != 0]
    groups = [{"params": matrices, "muon": True, "weight_decay": weight_decay},
              {"params": decay, "muon": False, "weight_decay": weight_decay},
              {"params": no_decay, "muon": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def describe_muon_groups(model_parts: list[nn.Module]) -> str:
    """One line: which roles step with Muon and which with AdamW, tensors and parameters of each, over this
    rank's model parts."""
    counts: dict[Role, list[int]] = {}
    for part in model_parts:
        for r in parameter_roles(part):
            if r.param.requires_grad:
                c = counts.setdefault(r.role, [0, 0])
                c[0], c[1] = c[0] + 1, c[1] + r.param.numel()

    def roles(which):
        return ", ".join(f"{role.value} ({n} tensors, {k:,} parameters)" for role, (n, k) in counts.items()
                         if which(role)) or "nothing"
    return (f"optimizer: Muon on {roles(lambda r: r is Role.MATRIX)}; AdamW on "
            f"{roles(lambda r: r is not Role.MATRIX)}")

"""Mixture of experts in the decoder's feed-forward slot: token-choice top-k routing, dropless grouped experts.

The router scores every expert per token (softmax as OLMoE and Mixtral, or sigmoid as DeepSeek-V3) and
sends the token to its top_k experts, weighted by their scores (renormalized over the chosen ones with
norm_topk_prob). An expert bias (aux-loss-free balancing, sigmoid routers) shifts which experts are chosen,
never the weights; the trainer moves it between steps (trainer/balance.py). No token is dropped: experts
take whatever they are sent, through a grouped matmul (ops/grouped_mm.py).

The balance losses (load balancing, router z-loss) enter the gradient where they arise (AuxLoss), so
pipeline stages need no extra outputs, with statistics the trainer defines over the whole global batch
(BalanceState). Tokens reach the experts through `dispatcher`: in-process here, an all-to-all over the
expert-parallel group once distributed/expert_parallel.py swaps it. Nothing else here knows about parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import PrepareModuleInput

from torchtitan.ops.grouped_mm import grouped_mm
from torchtitan.ops.moe import LocalDispatch, ScaleGrad, local_weight

SCORE_FUNCS = ("softmax", "sigmoid")
# The experts' gated MLP: SwiGLU, or gpt-oss's clamped one (gate clamped above and up to +-limit,
# gate * sigmoid(alpha * gate) * (up + 1)).
EXPERT_GATES = ("swiglu", "clamped_swiglu")


@dataclass
class MoEArgs:
    """The experts of the MoE layers; which layers are MoE: `is_moe_layer`."""

    num_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 1024  # width of each expert's SwiGLU
    score_func: str = "softmax"
    norm_topk_prob: bool = False  # renormalize the chosen experts' scores to sum to one
    expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias added to the scores for the choice
    shared_expert_hidden_dim: int = 0  # > 0: a dense SwiGLU every token also goes through
    n_dense_layers: int = 0  # the first layers keep a dense feed-forward (DeepSeek-V3 style)
    # Qwen3-MoE's layer selection: every sparse_step-th layer is MoE (decoder_sparse_step), except the layers
    # listed in dense_layer_ids (mlp_only_layers), which keep a dense feed-forward.
    sparse_step: int = 1
    dense_layer_ids: tuple[int, ...] = ()
    router_bias: bool = False  # the gate's linear map has a bias (gpt-oss)
    expert_linear_bias: bool = False  # every expert projection has a bias (gpt-oss)
    # Node-limited routing (DeepSeek-V3): experts in n_group groups, a token choosing among the topk_group groups
    # whose two best (bias-shifted) scores sum highest.
    n_group: int = 1
    topk_group: int = 1
    route_scale: float = 1.0  # the chosen experts' weights multiplied by it (routed_scaling_factor)
    gate: str = "swiglu"  # one of EXPERT_GATES
    swiglu_alpha: float = 1.702  # clamped_swiglu only
    swiglu_limit: float = 7.0  # clamped_swiglu only

    def __post_init__(self) -> None:
        self.dense_layer_ids = tuple(self.dense_layer_ids)  # a list after a JSON round trip
        if self.gate not in EXPERT_GATES:
            raise ValueError(f"model args moe.gate = {self.gate!r} is not one of {', '.join(EXPERT_GATES)}")
        if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"model args moe.n_group = {self.n_group} must divide num_experts ({self.num_experts}) "
                             f"and moe.topk_group = {self.topk_group} be in 1..n_group")
        if self.sparse_step < 1:
            raise ValueError(f"model args moe.sparse_step = {self.sparse_step}; it must be >= 1")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"model args moe.score_func = {self.score_func!r} is not one of {', '.join(SCORE_FUNCS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model args moe.top_k = {self.top_k} must be in 1..num_experts ({self.num_experts})")


    def is_moe_layer(self, layer_id: int) -> bool:
        return (layer_id >= self.n_dense_layers and layer_id not in self.dense_layer_ids
                and (layer_id + 1) % self.sparse_step == 0)


@dataclass
class BalanceState:
    """What the trainer tells a MoE layer about the step (set by trainer/balance.py), and what the layer
    accumulates for it. Defaults: no aux losses, statistics of this rank's micro-batch alone."""

    load_balance_weight: float = 0.0
    z_loss_weight: float = 0.0
    n_tokens: float = 0.0  # tokens routed in the whole global batch: the losses' normalizer (0: this micro-batch)
    grad_scale: float = 1.0  # undoes data/context-parallel gradient averaging, as the LM loss's scale does
    group: dist.ProcessGroup | None = None  # the ranks whose tokens share a micro-batch's expert counts
    fixed_counts: torch.Tensor | None = None  # expert counts of the whole global batch (the routing pass)
    recording: bool = False  # routing pass: only count
    # Off while a forward is not one of the step's micro-batches (pipeline shape inference): nothing counts.
    counting: bool = True
    counts: torch.Tensor | None = None  # tokens per expert this step, this rank (accumulated)
    load_balance_sum: torch.Tensor | None = None  # this rank's share of the step's loss values (detached)
    z_loss_sum: torch.Tensor | None = None

    def reset(self) -> None:
        self.counts = self.load_balance_sum = self.z_loss_sum = self.fixed_counts = None

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


class AuxLoss(torch.autograd.Function):
    """Identity on the layer output; backward also feeds `scale` as the gradient of the auxiliary loss, so
    the loss joins the objective without being returned up the model."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class GroupedExperts(nn.Module):
    """num_experts gated MLPs as three (E, out, in) weights: w1 (gate), w3 (up), w2 (down), and with
    expert_linear_bias their (E, out) biases b1, b3, b2."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        num_experts, hidden_dim = args.num_experts, args.hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        if args.expert_linear_bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
            self.b2 = nn.Parameter(torch.empty(num_experts, dim))
            self.b3 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        else:
            self.b1 = self.b2 = self.b3 = None
        self.gate, self.alpha, self.limit = args.gate, args.swiglu_alpha, args.swiglu_limit
        # Expert parallel sets 1/ep: the experts' gradients sum over the expert group's tokens, and data
        # parallel averages them over the other data ranks only (distributed/expert_parallel.py).
        self.grad_scale = 1.0

    def reset_biases(self) -> None:
        for b in (self.b1, self.b2, self.b3):
            if b is not None:
                nn.init.zeros_(b)

    def _project(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, counts: torch.Tensor,
                 rows: torch.Tensor | None) -> torch.Tensor:
        out = grouped_mm(x, w, counts)
        return out if b is None else out + b[rows]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (T, dim) rows sorted by (local) expert; counts: rows per local expert."""
        params = [local_weight(p) for p in (self.w1, self.w2, self.w3, self.b1, self.b2, self.b3) if p is not None]
        if self.grad_scale != 1.0:
            params = [ScaleGrad.apply(p, self.grad_scale) for p in params]
        w1, w2, w3, *biases = params
        b1, b2, b3 = biases if biases else (None, None, None)
        rows = None
        if biases:  # each row's local expert, for its bias (the row count is known: no host sync)
            rows = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts,
                                           output_size=x.shape[0])
        gate, up = self._project(x, w1, b1, counts, rows), self._project(x, w3, b3, counts, rows)
        if self.gate == "clamped_swiglu":
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            h = gate * torch.sigmoid(gate * self.alpha) * (up + 1)
        else:
            h = F.silu(gate) * up
        return self._project(h, w2, b2, counts, rows)


class Router(nn.Module):
    """The gate: a linear map to one score per expert (HF's mlp.gate)."""

    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.gate = nn.Linear(dim, args.num_experts, bias=args.router_bias)
        self.score_func, self.top_k, self.norm_topk_prob = args.score_func, args.top_k, args.norm_topk_prob
        self.n_group, self.topk_group, self.route_scale = args.n_group, args.topk_group, args.route_scale
        if args.expert_bias:
            # Learned outside autograd, between steps: state of the run, saved in checkpoints.
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, dim) -> logits (T, E) in float32 or wider, scores (T, E), chosen experts (T, k), their
        weights (T, k)."""
        bias = local_weight(self.gate.bias) if self.gate.bias is not None else None
        logits = F.linear(x, local_weight(self.gate.weight), bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = torch.softmax(logits, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits)
        choice = scores + self.expert_bias if self.expert_bias is not None else scores
        if self.n_group > 1:
            groups = choice.view(choice.shape[0], self.n_group, -1)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)
        indices = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return logits, scores, indices, weights


class MoE(nn.Module):
    """Router + grouped experts (+ an optional shared expert) in place of a block's SwiGLU."""

    is_moe = True

    def __init__(self, dim: int, args: MoEArgs, shared_expert: nn.Module | None = None):
        super().__init__()
        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.router = Router(dim, args)
        self.experts = GroupedExperts(dim, args)
        self.shared_expert = shared_expert
        self.dispatcher = LocalDispatch()
        self.balance = BalanceState()

    def projections(self) -> dict[str, list[torch.Tensor]]:
        """The weights by role, for init schemes (the dense SwiGLU's roles, plus the router): expert weights
        are (E, out, in), each expert initialized as a dense SwiGLU of its width would be."""
        e = self.experts
        out = {"w1": [e.w1], "w3": [e.w3], "w2": [e.w2], "router": [self.router.gate.weight]}
        if self.shared_expert is not None:
            for role, ws in self.shared_expert.projections().items():
                out[role] += ws
        return out

    def tp_plan(self) -> dict:
        """Under TP each rank routes its own sequence shard, a local tensor; the expert (and shared-expert)
        weights are placed by distributed/expert_parallel.py apply_moe_parallel."""
        return {"": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                       use_local_output=True)}

    def reset_buffers(self) -> None:
        """After to_empty: the expert bias (balancing state) and the projections' biases start at zero (a
        checkpoint load then sets the run's)."""
        if self.router.expert_bias is not None:
            self.router.expert_bias.zero_()
        if self.router.gate.bias is not None:
            nn.init.zeros_(self.router.gate.bias)
        self.experts.reset_biases()

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eager under torch.compile: token counts per expert change every step and reach the host, and the
        balance statistics are Python-side state."""
        shape = x.shape
        if x.is_meta:  # shape inference (pipeline stages): routing needs values
            return torch.empty_like(x)
        x = x.reshape(-1, shape[-1])
        logits, scores, indices, weights = self.router(x)
        out = self.dispatcher(x, indices, weights, self.experts)
        if self.shared_expert is not None:
            out = out + self.shared_expert.local_forward(x)
        aux = self._aux_loss(logits, scores, indices)
        if aux is not None:
            out = AuxLoss.apply(out, aux, self.balance.grad_scale)
        return out.view(shape)

    def _aux_loss(self, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of load-balancing + z-loss: shares summed over ranks and micro-batches give the
        global batch's losses. None where no gradient is taken (evaluation) or while recording counts."""
        st = self.balance
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts).to(scores.dtype)
        # Activation checkpointing runs forward again in backward: count once.
        counting = st.counting and not _recomputing()
        if st.recording:
            if counting:
                st.add("counts", counts)
            return None
        if not torch.is_grad_enabled():
            return None
        if counting:
            st.add("counts", counts)
        n_tokens = st.n_tokens or float(scores.shape[0])
        aux = None
        if st.load_balance_weight > 0:
            if st.fixed_counts is not None:
                total = st.fixed_counts
            else:
                total = counts.clone()
                if st.group is not None:
                    dist.all_reduce(total, group=st.group)
            # Switch Transformer's loss, E * sum_e f_e P_e: f_e the share of assignments expert e got (over the
            # counted batch), P_e its mean router probability over the global batch. 1 when balanced.
            f = total / total.sum().clamp(min=1)
            # (sigmoid scores are normalized per token into probabilities first, as DeepSeek-V3 does)
            probs = scores if self.router.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
            lb = self.num_experts * (f * probs.sum(0)).sum() / n_tokens
            if counting:
                st.add("load_balance_sum", lb)
            aux = st.load_balance_weight * lb
        if st.z_loss_weight > 0:
            z = torch.logsumexp(logits, dim=-1).square().sum() / n_tokens
            if counting:
                st.add("z_loss_sum", z)
            aux = st.z_loss_weight * z if aux is None else aux + st.z_loss_weight * z
        return aux


def _recomputing() -> bool:
    """Inside backward: activation checkpointing recomputing this forward."""
    return torch._C._current_graph_task_id() != -1

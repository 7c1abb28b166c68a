"""Replica groups that die and rejoin without stopping the run: torchft's Manager over the dp_replicate dimension.

Each replica group is its own torchrun job (its own default process group, mesh and TCPStore) with
data_parallel_replicate_degree 1; FSDP/TP/PP/CP work inside it as without fault tolerance. Across groups, rank r
of every group talks to rank r of the others through torchft's reconfigurable process group, which the Manager
rebuilds for the replica groups present at each step (the quorum, from the lighthouse).

One step, synchronous mode (docs/fault_tolerance.md):
  start_step()    quorum; a group behind the others (a restarted one) loads model, optimizer, LR schedule, data
                  position, train state from a live peer here, over torchft's HTTP transport: no checkpoint is read
  sum()           labelled tokens and loss summed over the groups present, so the loss normalizer is theirs
  reduce_grads()  gradients summed over the groups present (each is already scaled by the global token count)
  should_commit() the ranks of this group agree no collective failed; if a group died mid-step, the survivors do
                  not update and redo the step with the next quorum (the data position moves only on commit). A
                  group that committed a step another did not is ahead at the next quorum and heals it

The quorum is synchronous (torchft's use_async_quorum=False): a rejoining group is healed before its forward,
so it trains on the step it joins and from then on holds bitwise the same weights as the others (the same
gradients, summed by one all-reduce, applied to the same state).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from torchtitan.config.job_config import FaultTolerance
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.errors import ConfigError

logger = logging.getLogger("torchtitan")

# Gradients are all-reduced in flat buckets of at most this many elements: one collective per bucket.
BUCKET_ELEMENTS = 1 << 24


def check_fault_tolerance(cfg: FaultTolerance, dims: ParallelDims) -> None:
    if not 0 <= cfg.replica_id < cfg.group_size:
        raise ConfigError(f"fault_tolerance.replica_id = {cfg.replica_id} must be in 0..group_size-1 "
                          f"(fault_tolerance.group_size = {cfg.group_size})")
    if not 1 <= cfg.min_replica_size <= cfg.group_size:
        raise ConfigError(f"fault_tolerance.min_replica_size = {cfg.min_replica_size} must be in 1..group_size "
                          f"({cfg.group_size})")
    if dims.dp_replicate != 1:
        raise ConfigError(f"parallelism.data_parallel_replicate_degree = {dims.dp_replicate}: with fault tolerance "
                          "the replicate dimension is fault_tolerance.group_size (one torchrun job per replica "
                          "group); set data_parallel_replicate_degree = 1")
    if not (cfg.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
        raise ConfigError("fault_tolerance.enable needs the lighthouse address: fault_tolerance.lighthouse = "
                          "http://host:29510 or TORCHFT_LIGHTHOUSE (start it with `torchft_lighthouse "
                          "--min_replicas 1`)")


def _to_local(x):
    """A state dict with every DTensor replaced by this rank's shard (the same layout receives it)."""
    if isinstance(x, DTensor):
        return x.to_local()
    if isinstance(x, dict):
        return {k: _to_local(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_local(v) for v in x)
    return x


def _like(received, current):
    """`received` (local shards) as DTensors wherever this rank's own state dict has one."""
    if isinstance(current, DTensor):
        local = received.to(current.device)
        return DTensor.from_local(local, current.device_mesh, current.placements, shape=current.shape,
                                  stride=current.stride())
    if isinstance(received, dict) and isinstance(current, dict):
        return {k: _like(v, current.get(k)) for k, v in received.items()}
    return received


class _LiveState:
    """The save/load pair torchft calls for one Stateful when a peer recovers from this group."""

    def __init__(self, obj: Stateful):
        self.obj = obj

    def save(self):
        return _to_local(self.obj.state_dict())

    def load(self, state) -> None:
        self.obj.load_state_dict(_like(state, self.obj.state_dict()))


class ReplicaGroups:
    """This replica group's view of the others: quorum, cross-group reductions, commit (torchft Manager)."""

    def __init__(self, cfg: FaultTolerance, dims: ParallelDims, device: torch.device, log_folder: str):
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        check_fault_tolerance(cfg, dims)
        self.cfg, self.device = cfg, device
        timeout = timedelta(seconds=cfg.timeout_seconds)
        self.pg = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.manager = Manager(
            pg=self.pg, load_state_dict=None, state_dict=None, min_replica_size=cfg.min_replica_size,
            use_async_quorum=False,  # heal before the forward: a rejoining group trains on the step it joins
            init_sync=False,  # every group initializes the same weights from the same seed
            timeout=timeout, quorum_timeout=timedelta(seconds=cfg.quorum_timeout_seconds),
            rank=rank, world_size=world, replica_id=f"replica_{cfg.replica_id}",
            lighthouse_addr=cfg.lighthouse or None)
        self.present, self.rank = 0, 0  # groups in this step's quorum, and this group's index among them
        self._on_commit: list[Callable[[int, int, int], dict]] = []
        self._last_quorum: tuple[int, int] | None = None
        self._model: Stateful | None = None
        self._joined = False
        os.makedirs(log_folder, exist_ok=True)
        self._log_path = os.path.join(log_folder, f"steps_rank{rank}.jsonl")

    @property
    def replica_id(self) -> int:
        return self.cfg.replica_id

    def register_state(self, states: dict[str, Stateful]) -> None:
        """What a recovering peer receives from this group (the checkpointed state, shard by shard)."""
        for key, obj in states.items():
            live = _LiveState(obj)
            self.manager.register_state_dict_fn(key, live.load, live.save)
        self._model = states.get("model")

    def on_commit(self, fn: Callable[[int, int, int], dict]) -> None:
        """fn(step, present, rank) after every committed step (the data position moves only then); what it
        returns goes into this step's record in steps_rank{rank}.jsonl."""
        self._on_commit.append(fn)

    def join(self) -> bool:
        """The first quorum, before anything is loaded: True when live groups are ahead and this group was healed
        from one of them (then no checkpoint is read). This quorum is the first step's."""
        self._start_quorum()
        self._joined = True
        return self.manager.current_step() > 0

    def set_step(self, step: int) -> None:
        """The step this group resumes from (a checkpoint): the quorum heals groups behind the furthest one."""
        self.manager.load_state_dict({"step": step, "batches_committed": 0})

    def start_step(self) -> None:
        """Join this step's quorum; a group behind the others is healed from a live peer before returning."""
        if self._joined:  # join() took this step's quorum
            self._joined = False
            return
        self._start_quorum()

    def _start_quorum(self) -> None:
        self.manager.start_quorum()
        if self.manager.errored() is not None:
            logger.warning(f"fault tolerance: quorum failed ({self.manager.errored()}); the step will be redone")
        self.present = self.manager.num_participants()
        self.rank = self.manager.participating_rank() or 0
        if (self.present, self.rank) != self._last_quorum:
            logger.info(f"fault tolerance: replica group {self.cfg.replica_id} is {self.rank} of {self.present} "
                        f"present at step {self.manager.current_step() + 1} (min {self.cfg.min_replica_size})")
            self._last_quorum = (self.present, self.rank)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the groups present (a failed collective leaves garbage and fails the commit)."""
        x = x.clone()
        self.manager.allreduce(x, reduce_op=dist.ReduceOp.SUM).wait()
        return x

    @torch.no_grad()
    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum this rank's gradient shards with the same rank of every other group present, in flat buckets."""
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        for g in grads:
            groups = buckets.setdefault(g.dtype, [[]])
            if groups[-1] and sum(t.numel() for t in groups[-1]) + g.numel() > BUCKET_ELEMENTS:
                groups.append([])
            groups[-1].append(g)
        works = []
        for groups in buckets.values():
            for bucket in groups:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                works.append((bucket, flat, self.manager.allreduce(flat, reduce_op=dist.ReduceOp.SUM)))
        for bucket, flat, work in works:
            work.wait()
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def should_commit(self) -> bool:
        """Whether every group present finished the step; if so, the commit hooks run."""
        ok = self.manager.should_commit()
        if ok:
            step = self.manager.current_step()
            record = {"step": step, "replica": self.cfg.replica_id, "present": self.present, "rank": self.rank}
            for fn in self._on_commit:
                record.update(fn(step, self.present, self.rank))
            if self.cfg.log_weight_digest and self._model is not None:
                record["weights"] = self._weight_digest()
            with open(self._log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            logger.warning(f"fault tolerance: step {self.manager.current_step() + 1} not committed "
                           f"({self.manager.errored()}); redoing it with the next quorum")
        return ok

    def _weight_digest(self) -> str:
        """sha256 of this rank's weight shards as the step begins (before its update): equal across groups means
        bitwise-equal weights."""
        h = hashlib.sha256()
        for name, value in sorted(_to_local(self._model.state_dict()).items()):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def saves_checkpoints(self) -> bool:
        """One group writes the checkpoints: the first of this step's quorum."""
        return self.rank == 0

    def close(self) -> None:
        self.manager.shutdown(wait=False)

"""Replica groups that die and rejoin without stopping the run: torchft's Manager over the dp_replicate dimension.

Each replica group is its own torchrun job (its own default process group, mesh and TCPStore) with
data_parallel_replicate_degree 1; FSDP/TP/PP/CP work inside it as without fault tolerance. Across groups, rank r
of every group talks to rank r of the others through torchft's reconfigurable process group, which the Manager
rebuilds for the replica groups present at each step (the quorum, from the lighthouse).

Fault tolerance off is SingleGroup: the same interface, every hook the identity. The torchft groups are two
classes, SyncReplicaGroups and DiLoCoGroups (build_replica_groups picks).

One step, synchronous mode (docs/fault_tolerance.md):
  start_step()    quorum; a group behind the others (a restarted one) loads model, optimizer, LR schedule, data
                  position, train state from a live peer here, over torchft's HTTP transport: no checkpoint is read
  sum()           labelled tokens and loss summed over the groups present, so the loss normalizer is theirs
  reduce_grads()  gradients summed over the groups present (each is already scaled by the global token count)
  commit()        the ranks of this group agree no collective failed; if a group died mid-step, the survivors do
                  not update and redo the step with the next quorum (the data position moves only on commit). A
                  group that committed a step another did not is ahead at the next quorum and heals it

The quorum is synchronous (torchft's use_async_quorum=False): a rejoining group is healed before its forward,
so it trains on the step it joins and from then on holds bitwise the same weights as the others (the same
gradients, summed by one all-reduce, applied to the same state).

Semi-synchronous mode, fault_tolerance.semi_sync_method = "diloco" (torchft's DiLoCo, one fragment): no
cross-group collective in a step; each group takes sync_steps (H) optimizer steps on its own block of the global
sample order, then sync(): quorum (a group behind is healed here), pseudo-gradients (weights at the last sync minus
this group's weights) averaged over the groups present, the block ids they trained summed into one list, commit,
outer SGD step from the last sync's weights. Every quorum is a sync, the first (resume()) included: a restarted group
waits in it for the next sync of the live ones, is healed from one of them (its weights, inner optimizer, DiLoCo's
last-sync weights and outer momentum, data state) and takes part in that sync with the copied pseudo-gradient, so
both leave the sync with bitwise the same weights. A sync that does not commit leaves the weights of the last one.
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

logger = logging.getLogger("torchtitan")

# Gradients are all-reduced in flat buckets of at most this many elements: one collective per bucket.
BUCKET_ELEMENTS = 1 << 24


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


class SingleGroup:
    """Fault tolerance off: this job is the only replica group. The same interface as the torchft groups, each
    hook the identity, so the loop and the step have no fault-tolerance branches."""

    data_order = "local"  # each dp rank reads its own share (components/dataloader.py)
    present, rank, sync_steps = 1, 0, 1
    saves_checkpoints = True

    def __init__(self, log_folder: str):
        self.log_folder = log_folder

    def register_state(self, states: dict[str, Stateful], model_parts: list[torch.nn.Module], optimizers) -> None:
        """What a peer that recovers from this group would receive (nothing: there are no peers)."""

    def resume(self, load: Callable[[], int]) -> int:
        """The step to start from: load() reads the checkpoint (0: none); a torchft group may be healed instead."""
        return load()

    def start_step(self) -> None:
        """Before a step's data is read: the step's quorum under fault tolerance."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the replica groups present."""
        return x

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Gradients summed over the replica groups present."""

    def commit(self) -> bool:
        """Whether the step may update the weights (False: a group failed mid-step; redo it)."""
        return True

    def end_step(self, step: int) -> None:
        """After the update: the semi-synchronous groups' sync, every sync_steps steps."""

    def metrics(self) -> dict:
        """What goes into the step's logged record."""
        return {}

    def close(self) -> None:
        pass


def build_replica_groups(cfg: FaultTolerance, dims: ParallelDims, device: torch.device,
                         dump_folder: str) -> SingleGroup:
    """This job's replica group: alone, or one of cfg.group_size under torchft (synchronous or DiLoCo). Each
    torchft group logs to its own folder."""
    if not cfg.enable:
        return SingleGroup(dump_folder)
    cls = SyncReplicaGroups if cfg.semi_sync_method == "sync" else DiLoCoGroups
    return cls(cfg, dims, device, os.path.join(dump_folder, f"replica_{cfg.replica_id}"))


class _TorchftGroups(SingleGroup):
    """This replica group's view of the others through torchft's Manager: quorum, cross-group reductions,
    commit, live recovery, and the per-step record in {log_folder}/steps_rank{rank}.jsonl."""

    def __init__(self, cfg: FaultTolerance, dims: ParallelDims, device: torch.device, log_folder: str):
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        super().__init__(log_folder)
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
        self._train_state: Stateful | None = None
        os.makedirs(log_folder, exist_ok=True)
        self._log_path = os.path.join(log_folder, f"steps_rank{rank}.jsonl")

    @property
    def replica_id(self) -> int:
        return self.cfg.replica_id

    @property
    def saves_checkpoints(self) -> bool:
        """One group writes the checkpoints: the first of this step's quorum."""
        return self.rank == 0

    def register_state(self, states: dict[str, Stateful], model_parts: list[torch.nn.Module], optimizers) -> None:
        """What a recovering peer receives from this group: the checkpointed state, shard by shard."""
        for key, obj in states.items():
            live = _LiveState(obj)
            self.manager.register_state_dict_fn(key, live.load, live.save)
        self._model = states.get("model")
        self._train_state = states.get("train_state")

    def on_commit(self, fn: Callable[[int, int, int], dict]) -> None:
        """fn(step, present, rank) after every committed step (the data position moves only then); what it
        returns goes into this step's record in steps_rank{rank}.jsonl."""
        self._on_commit.append(fn)

    def metrics(self) -> dict:
        return {"replicas": self.present}

    def _start_quorum(self) -> None:
        self.manager.start_quorum()
        if self.manager.errored() is not None:
            logger.warning(f"fault tolerance: quorum failed ({self.manager.errored()}); the step will be redone")
        self.present = self.manager.num_participants()
        self.rank = self.manager.participating_rank() or 0
        if (self.present, self.rank) != self._last_quorum:
            at = self.quorum_unit
            logger.info(f"fault tolerance: replica group {self.cfg.replica_id} is {self.rank} of {self.present} "
                        f"present at {at} {self.manager.current_step() + 1} (min {self.cfg.min_replica_size})")
            self._last_quorum = (self.present, self.rank)

    def _record(self, step: int) -> dict:
        record = {"step": step, "replica": self.cfg.replica_id, "present": self.present, "rank": self.rank}
        for fn in self._on_commit:
            record.update(fn(step, self.present, self.rank))
        return record

    def _write(self, record: dict, digest: bool = False) -> None:
        if digest and self.cfg.log_weight_digest and self._model is not None:
            record["weights"] = self._weight_digest()
        with open(self._log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _weight_digest(self) -> str:
        """sha256 of this rank's weight shards as the step begins (before its update; DiLoCo: after the sync):
        equal across groups means bitwise-equal weights."""
        h = hashlib.sha256()
        for name, value in sorted(_to_local(self._model.state_dict()).items()):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def close(self) -> None:
        self.manager.shutdown(wait=False)


class SyncReplicaGroups(_TorchftGroups):
    """Synchronous mode: tokens, loss and gradients summed over the groups present at every step, which commits
    only if no cross-group collective failed."""

    data_order = "global"  # the groups present take consecutive blocks of one global order (ReplicaDataloader)
    quorum_unit = "step"  # what the manager counts

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._joined = False

    def resume(self, load: Callable[[], int]) -> int:
        """The first quorum, before anything is loaded: a group behind live ones is healed from one of them (no
        checkpoint is read); otherwise the checkpoint's step, which the quorum uses to heal groups behind it."""
        self._start_quorum()
        self._joined = True
        if self.manager.current_step() > 0:
            return self._train_state.step
        # The job (re)starts: its first step commits only with every group present, so groups started together
        # train step 1 together rather than racing to the lighthouse (the first there would train alone and heal
        # the others). torchft 0.2.0 reads this attribute at should_commit; it is reset at the first commit.
        self.manager._min_replica_size = self.cfg.group_size
        step = load()
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        return step

    def start_step(self) -> None:
        """Join this step's quorum; a group behind the others is healed from a live peer before returning."""
        if self._joined:  # resume() took this step's quorum
            self._joined = False
            return
        self._start_quorum()

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

    def commit(self) -> bool:
        """Whether every group present finished the step; if so, the commit hooks run."""
        if not self.manager.should_commit():
            logger.warning(f"fault tolerance: step {self.manager.current_step() + 1} not committed "
                           f"({self.manager.errored()}); redoing it with the next quorum")
            return False
        self.manager._min_replica_size = self.cfg.min_replica_size
        self._write(self._record(self.manager.current_step()), digest=True)
        return True


class DiLoCoGroups(_TorchftGroups):
    """Semi-synchronous mode (torchft's DiLoCo, one fragment): each group takes sync_steps optimizer steps on its
    own data block, then the groups present average their pseudo-gradients and take an outer SGD step."""

    data_order = "blocks"  # each group trains a block of the global order per sync (BlockDataloader)
    quorum_unit = "sync"

    def __init__(self, cfg: FaultTolerance, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.sync_steps = cfg.sync_steps
        self._fragment = None  # torchft's DiLoCo fragment, built by register_state
        self._block: Callable[[], int] | None = None  # the data block this group trained since the last sync
        self._settle: Callable[[bool, list[int]], dict] | None = None
        self._committed = False  # whether the last sync committed

    def register_state(self, states: dict[str, Stateful], model_parts: list[torch.nn.Module], optimizers) -> None:
        """Also DiLoCo's state, over `model_parts` trained by `optimizers` (the inner ones)."""
        super().register_state(states, model_parts, optimizers)
        from torchft.local_sgd import DiLoCo

        (part,) = model_parts  # trainer/checks.py: one model part per rank (no pipeline parallel)
        params = list(part.parameters())
        outer = torch.optim.SGD(params, lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum,
                                nesterov=self.cfg.outer_momentum > 0)
        # DiLoCo registers its state (weights at the last sync, outer optimizer) for healing and keeps that copy on
        # the CPU. It is not entered as a context manager: its optimizer hooks would sync on the H-th call of
        # optimizer.step(), which a step skipped by the non-finite or spike guard does not make, and they start the
        # quorum themselves; sync() below drives the fragment at the H-th *step* instead, with the block exchange
        # before the commit. torchft 0.2.0 has no public handle on the fragment: `_fragments` is its own attribute.
        diloco = DiLoCo(self.manager, model_parts, optimizers.optimizers[0], outer, sync_every=self.sync_steps,
                        pin_memory=False)
        self._fragment = diloco._fragments[0]

    def on_sync(self, block: Callable[[], int], settle: Callable[[bool, list[int]], dict]) -> None:
        """Data accounting: block() is the data block this group trained since the last sync (-1: none);
        settle(committed, blocks) gets the blocks of every group in a committed sync (none if it did not commit)
        and returns what goes into the sync's record."""
        self._block, self._settle = block, settle

    def resume(self, load: Callable[[], int]) -> int:
        """The first quorum is a sync (the live groups' next one): a restarted group waits in it and is healed
        from a live group. Otherwise the checkpoint's step: its weights are the last sync's (checkpoints fall on
        syncs), the outer momentum starts again from zero (it is not checkpointed)."""
        while True:
            if self.sync(start=True):
                return self._train_state.step
            if self._committed:
                break
            # The job (re)starts and not every group was in the quorum: a group alone would train the first block
            # by itself and a second one, alone in the next quorum, the same block again. Wait for all of them.
            logger.info(f"fault tolerance: the job starts with all {self.cfg.group_size} replica groups; waiting")
        step = load()
        self.manager.load_state_dict({"step": step // self.sync_steps + 1, "batches_committed": 0})
        self._fragment.save_parameters()
        return step

    def end_step(self, step: int) -> None:
        """After this group's optimizer step: the step's record, and every sync_steps steps the sync (its result
        goes into the same record)."""
        record = self._record(step)
        if step % self.sync_steps == 0:
            self.sync(step, record)
        else:
            self._write(record)

    def sync(self, step: int | None = None, record: dict | None = None, start: bool = False) -> bool:
        """DiLoCo's outer step across the groups present; True when this group was healed in its quorum. Without
        `step` (resume()), the step is the train state's after the quorum: a healed group's is the live ones'.
        start: the first sync of this process; if no group has synced yet (the job starts), it commits only with
        every group present, as a synchronous job's first step (torchft reads the attribute at should_commit)."""
        before = self.manager.current_step()
        self._start_quorum()
        healed = self.manager.current_step() != before  # only a heal moves the step before the commit
        if start and not healed and self.manager.current_step() == 0:
            self.manager._min_replica_size = self.cfg.group_size
        try:
            return self._sync(step, record, healed)
        finally:
            self.manager._min_replica_size = self.cfg.min_replica_size

    def _sync(self, step: int | None, record: dict | None, healed: bool) -> bool:
        if step is None:
            step = self._train_state.step if self._train_state is not None else 0
        self._fragment.prepare_sync()  # pseudo-gradients, average over the groups present started
        # The block each group trained, summed into one slot per group: the data that goes into this sync. A healed
        # group sends the pseudo-gradient it received, so it adds no data of its own.
        blocks = torch.zeros(max(self.present, 1), dtype=torch.float64, device=self.device)
        if not healed and self._block is not None and 0 <= self.rank < len(blocks):
            blocks[self.rank] = self._block() + 1
        self.manager.allreduce(blocks, reduce_op=dist.ReduceOp.SUM).wait()
        committed = self._fragment.perform_sync()  # should_commit; if so, outer step from the last sync's weights
        self._committed = committed
        trained = sorted(int(b) - 1 for b in blocks.tolist() if b > 0) if committed else []
        record = dict(record or {"step": step, "replica": self.cfg.replica_id, "present": self.present,
                                 "rank": self.rank, "samples": []})
        record.update({"sync": True, "sync_present": self.present, "committed": committed, "healed": healed})
        if self._settle is not None:
            record.update(self._settle(committed, trained))
        if not committed:
            logger.warning(f"fault tolerance: sync at step {step} not committed ({self.manager.errored()}); the "
                           f"weights stay those of the last sync")
        self._write(record, digest=True)
        return healed

"""Parallel degrees, their validation, and the one DeviceMesh every parallelism uses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan.config.job_config import Parallelism
from torchtitan.tools.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# With expert parallel, dp_shard is two mesh dims: the ranks outside an expert group (experts are FSDP-sharded
# over them) and those inside it; the expert group is dp_shard_in_ep x cp.
EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Parallelism, world_size: int) -> ParallelDims:
        """Validate degrees against the world size; dp_shard = -1 takes what is left."""
        rep, shard, cp, tp, pp = (cfg.data_parallel_replicate_degree, cfg.data_parallel_shard_degree,
                                  cfg.context_parallel_degree, cfg.tensor_parallel_degree, cfg.pipeline_parallel_degree)
        others = rep * cp * tp * pp
        if shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} is not divisible by data_parallel_replicate_degree x "
                    "context_parallel_degree x "
                    f"tensor_parallel_degree x pipeline_parallel_degree = {rep}x{cp}x{tp}x{pp} = {others}")
            shard = world_size // others
        if rep * shard * cp * tp * pp != world_size:
            raise ConfigError(
                f"parallel degrees multiply to {rep}x{shard}x{cp}x{tp}x{pp} = {rep * shard * cp * tp * pp} "
                f"(dp_replicate x dp_shard x cp x tp x pp) but the world size is {world_size}; "
                f"set parallelism.data_parallel_shard_degree = -1 to infer it")
        ep = cfg.expert_parallel_degree
        if ep < 1 or (shard * cp) % ep or (ep > 1 and ep % cp):
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} must divide data_parallel_shard x context_parallel = "
                f"{shard}x{cp} = {shard * cp} and be a multiple of context_parallel_degree ({cp})")
        return cls(dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, pp=pp, world_size=world_size, ep=ep)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Flattened views: dp for data loading, dp_shard_cp for FSDP, dp_cp for loss averaging, dp_cp_tp for
        what every rank of a pipeline stage shares (MoE expert counts); with expert parallel also ep (the
        expert group) and efsdp (the ranks that FSDP-shard each expert)."""
        if self.ep > 1:
            in_ep = self.ep // self.cp
            sizes = (self.pp, self.dp_replicate, self.dp_shard // in_ep, in_ep, self.cp, self.tp)
            mesh = init_device_mesh(device_type, sizes, mesh_dim_names=EP_MESH_DIMS)
            shard = ("dp_shard_mod_ep", "dp_shard_in_ep")
            mesh[shard]._flatten("dp_shard")
            mesh["dp_shard_in_ep", "cp"]._flatten("ep")
            mesh["dp_shard_mod_ep"]._flatten("efsdp")
        else:
            mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                    mesh_dim_names=MESH_DIMS)
            shard = ("dp_shard",)
        mesh[("dp_replicate", *shard)]._flatten("dp")
        mesh[(*shard, "cp")]._flatten("dp_shard_cp")
        mesh[("dp_replicate", *shard, "cp")]._flatten("dp_cp")
        mesh[("dp_replicate", *shard, "cp", "tp")]._flatten("dp_cp_tp")
        self._mesh = mesh
        return mesh

    @property
    def mesh(self) -> DeviceMesh:
        assert self._mesh is not None, "call build_mesh first"
        return self._mesh

    @property
    def has_mesh(self) -> bool:
        return self._mesh is not None

    def local_rank(self, name: str) -> int:
        """This rank's index along mesh dim `name` (0 without a mesh)."""
        return self._mesh[name].get_local_rank() if self._mesh is not None else 0

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of mesh dim `name` (a flattened one too), or None where it is trivial
        (size 1, or no mesh because the world is one process): nothing to reduce over."""
        if self._mesh is None or self._mesh[name].size() == 1:
            return None
        return self._mesh[name].get_group()

    def describe(self) -> str:
        return (f"world {self.world_size}: pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} "
                f"cp={self.cp} tp={self.tp}" + (f" ep={self.ep}" if self.ep > 1 else ""))

"""ParallelDims: degrees validated against the world size, and the one mesh with its flattened views."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torchtitan.config.job_config import Parallelism
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.tools.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def dims(world: int, **kw) -> ParallelDims:
    return ParallelDims.from_config(Parallelism(**kw), world)


def test_shard_degree_takes_what_is_left():
    d = dims(16, data_parallel_replicate_degree=2, tensor_parallel_degree=2, context_parallel_degree=2)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.pp) == (2, 2, 2, 2, 1)
    assert d.dp == 4 and d.fsdp_enabled and d.tp_enabled and d.cp_enabled and not d.pp_enabled
    assert not dims(1).fsdp_enabled and not dims(1).dp_enabled


def test_degrees_that_do_not_fit_the_world_name_the_keys():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 1x1x4x1 = 4"):
        dims(6, tensor_parallel_degree=4)
    with pytest.raises(ConfigError, match=r"multiply to 1x2x1x2x1 = 4 .* but the world size is 8; .*-1 to infer"):
        dims(8, data_parallel_shard_degree=2, tensor_parallel_degree=2)


def test_no_mesh_means_no_groups():
    d = dims(1)
    assert not d.has_mesh and d.group("dp") is None and d.local_rank("cp") == 0


@pytest.mark.parametrize("ep,cp,shard,ok", [(2, 1, 4, True), (4, 2, 4, True), (3, 1, 4, False), (2, 4, 2, False),
                                             (8, 1, 4, False)])
def test_expert_parallel_degree_is_validated(ep, cp, shard, ok):
    p = Parallelism(expert_parallel_degree=ep, context_parallel_degree=cp, data_parallel_shard_degree=shard)
    if ok:
        assert ParallelDims.from_config(p, shard * cp).ep == ep
    else:
        with pytest.raises(ConfigError, match="expert_parallel_degree"):
            ParallelDims.from_config(p, shard * cp)


_MESH = """
import json, os, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtitan.config.job_config import Parallelism
from torchtitan.distributed.parallel_dims import ParallelDims
dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=16)
d = ParallelDims.from_config(Parallelism(data_parallel_replicate_degree=2, tensor_parallel_degree=2,
                                         pipeline_parallel_degree=2), 16)
mesh = d.build_mesh("cpu")
names = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp", "dp_cp")
print(json.dumps({"sizes": {n: mesh[n].size() for n in names}, "ranks": {n: d.local_rank(n) for n in names},
                  "groups": {n: d.group(n) is not None for n in names}}))
"""


def test_mesh_dims_and_flattened_views():
    """Built over a fake 16-rank process group, seen from global rank 5 (pp 0, rep 1, shard 0, cp 0, tp 1)."""
    proc = subprocess.run([sys.executable, "-c", _MESH], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sizes"] == {"pp": 2, "dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 2,
                            "dp": 4, "dp_shard_cp": 2, "dp_cp": 4}
    assert out["ranks"] == {"pp": 0, "dp_replicate": 1, "dp_shard": 0, "cp": 0, "tp": 1,
                            "dp": 2, "dp_shard_cp": 0, "dp_cp": 2}
    assert out["groups"] == {n: n != "cp" for n in out["sizes"]}

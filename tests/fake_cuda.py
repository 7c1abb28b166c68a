"""Running CUDA-only code paths on a CPU-only torch build, with fake tensors on device "cuda".

FakeTensorMode gives tensors a device and runs each op's meta kernel (shapes, dtypes, devices, argument
checks) without data, so a CUDA branch with a wrong op name, argument order, dtype or shape fails on CPU.
What the CPU wheel of torch 2.13 does not allow, and how `fake_cuda` works around it:

- autograd on a fake CUDA tensor that requires grad aborts the whole process (no CUDA device guard for the
  gradient accumulator): everything here runs under no_grad, and backward kernels are called directly;
- ops such as index_copy and repeat_interleave(Tensor) fail with "PyTorch is not linked with support for cuda
  devices" unless a Python dispatch mode sits above the fake mode: `CudaOps` is that mode, and it also records
  every op and each one that takes a CPU tensor;
- `t[...]`, `t[...] = v`, `t.copy_(s)` and a few more fail the same way in their Python bindings, before any
  dispatch: `_IndexShim` routes them to the aten ops (slice, select, index, index_put_, copy_, ...), which the
  fake mode handles;
- Module.to_empty swaps parameters in place, which a fake tensor refuses ("Cannot swap t1 because it has
  weakref associated with it"): modules are moved with the overwrite-on-conversion flag set.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA = torch.device("cuda", 0)


class CudaOps(TorchDispatchMode):
    """Every aten op run (by name, in order) and the ones that met a CPU tensor other than a 0-dim scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.cpu_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not str(func).startswith("prim."):
            name = func.overloadpacket.__name__
            self.ops.append(name)
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
                self.cpu_ops.append(f"{func}: {[str(t.device) for t in tensors]}")
        return out

    def count(self, name: str) -> int:
        return self.ops.count(name)


def _basic_index(t: torch.Tensor, index) -> tuple[torch.Tensor, list]:
    """`t[index]` for ints, slices, None and Ellipsis as view ops; integer tensors are left, with their dim."""
    index = index if isinstance(index, tuple) else (index,)
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim, advanced = t, 0, []
    for i in index:
        if i is Ellipsis:
            dim += t.dim() - explicit
            continue
        if i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, slice):
            out, dim = _slice(out, dim, i), dim + 1
        elif isinstance(i, torch.Tensor):
            advanced.append((dim, i))
            dim += 1
        else:
            raise NotImplementedError(f"fake CUDA indexing by {type(i).__name__}")
    return out, advanced


def _slice(t: torch.Tensor, dim: int, s: slice) -> torch.Tensor:
    start, stop, step = s.indices(t.shape[dim])
    return torch.ops.aten.slice.Tensor(t, dim, start, stop, step)


def _advanced(advanced: list) -> list:
    dims = [d for d, _ in advanced]
    indices: list = [None] * (max(dims) + 1)
    for d, i in advanced:
        indices[d] = i.nonzero().squeeze(-1) if i.dtype == torch.bool else i
    return indices


class _IndexShim(TorchFunctionMode):
    """`t[...]` and `t[...] = v` as aten ops (see the module docstring): ints, slices, None, Ellipsis and integer
    tensors; any other call its Python binding refuses on a CUDA tensor goes to the aten op of that name."""

    def __init__(self) -> None:
        super().__init__()
        self.rerouted: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            view, advanced = _basic_index(args[0], args[1])
            return torch.ops.aten.index.Tensor(view, _advanced(advanced)) if advanced else view
        if func is torch.Tensor.__setitem__:
            view, advanced = _basic_index(args[0], args[1])
            value = args[2] if isinstance(args[2], torch.Tensor) else torch.tensor(args[2], device=view.device)
            if advanced:
                torch.ops.aten.index_put_.default(view, _advanced(advanced), value.to(view.dtype))
            elif value is not view:
                torch.ops.aten.copy_.default(view, value)
            return None
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            name = _aten_name(getattr(func, "__name__", ""))
            if "not linked with support for cuda" not in str(e) or not hasattr(torch.ops.aten, name):
                raise
        self.rerouted.add(name)
        return getattr(torch.ops.aten, name)(*args, **kwargs)


_DUNDER = {"invert": "bitwise_not", "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
           "iand": "bitwise_and_", "ior": "bitwise_or_", "ixor": "bitwise_xor_", "truediv": "div", "itruediv": "div_",
           "iadd": "add_", "isub": "sub_", "imul": "mul_", "matmul": "matmul"}


def _aten_name(name: str) -> str:
    """The aten op of a Tensor method (`__invert__` is bitwise_not, `__iadd__` add_); reflected ones have none."""
    if name.startswith("__") and name.endswith("__"):
        return _DUNDER.get(name[2:-2], name[2:-2])
    return name


@contextlib.contextmanager
def fake_cuda() -> Iterator[CudaOps]:
    """Fake tensors (real ones, meta parameters to move among them, enter as fake: a real CPU tensor shows as a
    CPU op in the recorder), no autograd,
    and a recorder of the ops run."""
    recorder = CudaOps()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(recorder)
        stack.enter_context(_IndexShim())
        yield recorder


@contextlib.contextmanager
def overwrite_params_on_conversion() -> Iterator[None]:
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)


def assert_on_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device == CUDA, t.device


def assert_no_cpu_tensors(recorder: CudaOps) -> None:
    assert not recorder.cpu_ops, "ops that took a CPU tensor on the CUDA path:\n" + "\n".join(recorder.cpu_ops[:20])


class Ctx:
    """Stands in for an autograd.Function's ctx, so forward and backward can be called as plain functions."""

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

"""Dispatch-level probes for the hot path: host syncs, float64 tensors and op counts.

Run a model on the ``meta`` device (no memory, no compute) or on CPU under :class:`OpProbe` to see
what a GPU run would do: a host sync is an op that needs a device value on the host
(``.item()``, ``.tolist()``, ``nonzero``, boolean masking, device -> CPU copies).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
            _aten.is_nonzero.default, _aten.equal.default, _aten.unique_dim.default, _aten._unique2.default}


def _devices(x) -> set:
    out = set()
    if isinstance(x, torch.Tensor):
        out.add(x.device.type)
    elif isinstance(x, (list, tuple)):
        for y in x:
            out |= _devices(y)
    elif isinstance(x, dict):
        for y in x.values():
            out |= _devices(y)
    return out


class OpProbe(TorchDispatchMode):
    """Counts aten ops, host syncs and float64 tensors created off the CPU (or anywhere, if ``cpu_f64``)."""

    def __init__(self, compute_device: str):
        super().__init__()
        self.device = torch.device(compute_device).type
        self.reset()

    def reset(self):
        self.ops = 0
        self.syncs: Counter = Counter()
        self.f64: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in SYNC_OPS:
            self.syncs[str(func)] += 1
        out = func(*args, **kwargs)
        if func in (_aten._to_copy.default, _aten.copy_.default) and self.device != "cpu":
            src = _devices(args[1] if func is _aten.copy_.default else args[0])
            dst = _devices(out)
            if self.device in src and "cpu" in dst:
                self.syncs[f"{func} (device->cpu)"] += 1
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float64, torch.complex128):
                self.f64[f"{func} on {t.device.type}"] += 1
        return out

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

"""Dispatch-level probes for the hot path: host syncs, float64 tensors, op and kernel-launch counts,
and what ``torch.compile`` did (:class:`DynamoCounters`).

Run a model on the ``meta`` device (no memory, no compute) or on CPU under :class:`OpProbe` to see
what a GPU run would do: a host sync is an op that needs a device value on the host
(``.item()``, ``.tolist()``, ``nonzero``, boolean masking, device -> CPU copies). A kernel launch is
counted for every dispatched aten op that is not a view, an allocation or a metadata-only op
(:data:`NO_KERNEL_OPS`): what an eager (uncompiled) forward launches on a GPU, one kernel per op
(a few ops launch more than one; a compiled forward fuses elementwise ops and launches fewer).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
            _aten.is_nonzero.default, _aten.equal.default, _aten.unique_dim.default, _aten._unique2.default}
#: ops that launch no kernel besides the views (``OpOverload.is_view``): allocations and metadata
NO_KERNEL_OPS = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
                 _aten._unsafe_view.default, _aten.lift_fresh.default, _aten.set_.source_Storage_storage_offset,
                 _aten.sym_size.int, _aten.sym_stride.int, _aten.sym_numel.default, _aten.sym_storage_offset.default,
                 _aten.is_same_size.default, _aten._reshape_alias.default}


def launches_kernel(func) -> bool:
    """Whether aten op ``func`` launches a device kernel (see the module docstring)."""
    return not (getattr(func, "is_view", False) or func in NO_KERNEL_OPS)


def _devices(x) -> set:
    return {t.device.type for t in tree_leaves(x) if isinstance(t, torch.Tensor)}


class OpProbe(TorchDispatchMode):
    """Counts aten ops, kernel launches (:func:`launches_kernel`; ``by_op`` per op), host syncs and float64
    tensors created off the CPU."""

    def __init__(self, compute_device: str):
        super().__init__()
        self.device = torch.device(compute_device).type
        self.reset()

    def reset(self):
        self.ops = self.launches = 0
        self.by_op, self.syncs, self.f64 = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if launches_kernel(func):
            self.launches += 1
            self.by_op[func] += 1
        if func in SYNC_OPS:
            self.syncs[str(func)] += 1
        out = func(*args, **(kwargs or {}))
        if func in (_aten._to_copy.default, _aten.copy_.default) and self.device != "cpu":
            src = args[1] if func is _aten.copy_.default else args[0]
            if self.device in _devices(src) and "cpu" in _devices(out):
                self.syncs[f"{func} (device->cpu)"] += 1
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float64, torch.complex128):
                self.f64[f"{func} on {t.device.type}"] += 1
        return out

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())


def _first_line(text) -> str:
    lines = str(text).strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


class DynamoCounters:
    """What ``torch._dynamo`` did since :meth:`mark`: graphs compiled, frame compiles (first compiles and
    recompiles, with the guard that failed), graph breaks. Read from ``torch._dynamo.utils.counters``
    (``graph_break``: breaks Dynamo stepped over; ``unimplemented``: code it could not trace, which
    ``fullgraph=True`` turns into an error; ``stats.unique_graphs``) and its compilation metrics (one
    record per frame compile, ``recompile_reason`` set on a recompile). Nothing is reset, so other
    compiles in the process are not disturbed: :meth:`since` returns the differences."""

    def __init__(self):
        from torch._dynamo import utils
        self._utils = utils
        utils.set_compilation_metrics_limit(100_000)  # keep every record of this run (the default keeps 64)
        self.mark()

    def _raw(self) -> dict:
        c = self._utils.counters
        return {"graph_break": dict(c["graph_break"]), "unimplemented": dict(c["unimplemented"]),
                "graphs": int(c["stats"]["unique_graphs"]), "metrics": self._utils.get_compilation_metrics()}

    def mark(self) -> None:
        self._base = self._raw()

    def since(self) -> dict:
        """``graph_breaks`` (breaks + untraceable code), their reasons (first lines), ``graphs``,
        ``frame_compiles``, ``recompiles`` and their reasons, ``recompile_limit_hits`` (Dynamo gave up
        recompiling a frame), since the last :meth:`mark`."""
        now, base = self._raw(), self._base

        def delta(key):
            return {r: n - base[key].get(r, 0) for r, n in now[key].items() if n > base[key].get(r, 0)}
        breaks, unimpl = delta("graph_break"), delta("unimplemented")
        # hitting the recompile limit is logged as "unimplemented" too: it is a recompile, not a break
        limit = {r: n for r, n in unimpl.items() if "recompile limit" in str(r).lower()}
        unimpl = {r: n for r, n in unimpl.items() if r not in limit}
        seen = {id(m) for m in base["metrics"]}
        new = [m for m in now["metrics"] if id(m) not in seen]
        rec = [m for m in new if getattr(m, "recompile_reason", None)]
        return {"graph_breaks": sum(breaks.values()) + sum(unimpl.values()),
                "graph_break_reasons": sorted({_first_line(r) for r in (*breaks, *unimpl)}),
                "graphs": now["graphs"] - base["graphs"], "frame_compiles": len(new), "recompiles": len(rec),
                "recompile_reasons": sorted({_first_line(m.recompile_reason) for m in rec}),
                "recompile_limit_hits": sum(limit.values())}

"""Live-storage accounting under FakeTensorMode: what `torch.cuda.memory_allocated()` would read.

`StorageTracker` counts storages. It works as a TorchDispatchMode entered *inside* a FakeTensorMode, or (the
faster form the runner uses) fed by `tracking_fake_mode`, a FakeTensorMode that reports its top-level op
outputs. Every aten op output that brings a new storage into existence is counted once, rounded up to the \
CUDA caching allocator's 512-byte block, and
uncounted when the storage object dies (a weakref callback; storages keep one Python object for their whole
life, so the callback fires exactly when the last tensor, view or autograd-saved reference goes away).

Every allocation is logged with an event counter, so the set of tensors live at any peak can be rebuilt after
the fact (live at t <=> allocated at or before t and freed after t) without snapshotting at every new high.

One autograd behaviour differs for tensor subclasses and is replayed here: the engine sums two gradients that
meet at one input *in place* when the first is exclusively owned; it never does so for FakeTensors
(`tracked_backward` + `StorageTracker.inplace_donor`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..schema import Phase
from ..units import alloc_bytes

__all__ = ["StorageTracker", "AllocRecord", "StepStats", "PHASE_OF_SUB", "tracking_fake_mode", "tracked_backward"]

_ADD = torch.ops.aten.add.Tensor


def _dense(t: torch.Tensor) -> bool:
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    return bool(is_non_overlapping_and_dense_or_false(t))


_F, _L, _B, _O = (p.value for p in (Phase.FORWARD, Phase.LOSS, Phase.BACKWARD, Phase.OPTIMIZER))
# Sub-phase -> phase (schema.Phase, as the memory model names them). The step walks through them in this order.
PHASE_OF_SUB: dict[str, str] = {
    "setup": "setup",
    "vision_fwd": _F,
    "fwd": _F,
    "lm_head": _L,
    "loss_ce": _L,
    "out_fp32": _L,
    "ref_fwd": _L,
    "ref_loss": _L,
    "bwd_loss": _B,
    "bwd_lm_head": _B,
    "bwd_layers": _B,
    "opt_unscale": _O,
    "opt_clip": _O,
    "opt_step": _O,
    "opt_zero_grad": _O,
}


@dataclass
class AllocRecord:
    """One storage: when it appeared and died (event counter), its accounted bytes and where it came from."""

    t_alloc: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    op: str
    sub_phase: str
    step: int
    t_free: int | None = None
    host: bool = False  # a tensor that lives in host memory on the real run (not counted)
    released: bool = False  # its bytes were handed over to an in-place result (see `transfer`)


@dataclass
class StepStats:
    start_bytes: int = 0
    peak_bytes: int = 0
    peak_t: int = 0
    peak_sub_phase: str = ""
    end_bytes: int = 0
    sub_peaks: dict[str, int] = field(default_factory=dict)


class StorageTracker(TorchDispatchMode):
    """Counts live storage bytes (512-B rounded) of every tensor produced while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.t = 0
        self.records: list[AllocRecord] = []
        self._live: dict[int, tuple[AllocRecord, Any]] = {}
        self.sub_phase = "setup"
        self.step = 0
        self.steps: dict[int, StepStats] = {}
        self._in_step = False
        self.op_count = 0
        # autograd InputBuffer emulation (see `inplace_donor`)
        self._graph_nodes: list[Any] = []
        self._hooked: set[int] = set()
        self._done_idx: int | None = None
        self._backward_marks: list[int] = []
        self._ib_base: tuple[int, int] | None = None
        self._calibrating = False
        self.inplace_accumulations = 0

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _stats(self) -> StepStats | None:
        return self.steps.get(self.step) if self._in_step else None

    def set_sub_phase(self, name: str) -> None:
        if name not in PHASE_OF_SUB:
            raise ValueError(f"unknown sub-phase {name!r}")
        self.sub_phase = name
        st = self._stats()
        if st is not None and self.current > st.sub_peaks.get(name, -1):
            st.sub_peaks[name] = self.current

    def begin_step(self, step: int) -> None:
        self.step = step
        self.steps[step] = StepStats(start_bytes=self.current, peak_bytes=self.current, peak_t=self.t,
                                     peak_sub_phase="fwd")
        self._in_step = True
        self.set_sub_phase("fwd")

    def end_step(self) -> StepStats:
        st = self.steps[self.step]
        st.end_bytes = self.current
        self._in_step = False
        self.sub_phase = "setup"
        return st

    def _on_alloc(self, rec: AllocRecord) -> None:
        self.current += rec.nbytes
        st = self._stats()
        if st is None:
            return
        if self.current > st.peak_bytes:
            st.peak_bytes = self.current
            st.peak_t = rec.t_alloc
            st.peak_sub_phase = self.sub_phase
        if self.current > st.sub_peaks.get(self.sub_phase, -1):
            st.sub_peaks[self.sub_phase] = self.current

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is None:
            return
        rec = entry[0]
        if rec.released:
            return
        self.t += 1
        rec.t_free = self.t
        if not rec.host:
            self.current -= rec.nbytes

    def track(self, t: torch.Tensor, op: str = "(external)") -> None:
        """Count `t`'s storage if it is not counted yet (for tensors made outside the mode)."""
        self._track_one(t, op)

    def mark_host(self, t: torch.Tensor) -> None:
        """`t` would live in host memory on the real run (e.g. optimizer step counters of non-fused AdamW)."""
        entry = self._live.get(t.untyped_storage()._cdata)
        if entry is not None and not entry[0].host:
            entry[0].host = True
            self.current -= entry[0].nbytes

    def annotate(self, t: torch.Tensor, label: str) -> None:
        """Name the allocation behind `t` (a parameter, buffer, optimizer state...) for reports."""
        try:
            entry = self._live.get(t.untyped_storage()._cdata)
        except (NotImplementedError, RuntimeError):
            return
        if entry is not None:
            entry[0].op = label

    def _track_one(self, t: torch.Tensor, op: str, like: AllocRecord | None = None) -> None:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return
        key = storage._cdata
        if key in self._live:
            return
        self.t += 1
        rec = AllocRecord(
            t_alloc=self.t,
            nbytes=alloc_bytes(storage.nbytes()),
            shape=tuple(int(s) for s in t.shape),
            dtype=str(t.dtype).replace("torch.", ""),
            op=op if like is None else like.op,
            sub_phase=self.sub_phase if like is None else like.sub_phase,
            step=self.step if like is None else like.step,
        )
        self.records.append(rec)
        tracker_ref = weakref.ref(self)

        def _on_storage_death(_ref: Any, key: int = key) -> None:
            tracker = tracker_ref()
            if tracker is not None:
                tracker._free(key)

        self._live[key] = (rec, weakref.ref(storage, _on_storage_death))
        self._on_alloc(rec)

    # -- autograd's in-place gradient accumulation ----------------------------------------------------------------
    # When two gradients meet at one node input, the autograd engine's InputBuffer adds them *in place* into the
    # first one if it holds the only reference to a dense tensor (torch/csrc/autograd/input_buffer.cpp,
    # `can_accumulate_inplace`). It never does so for tensor subclasses, so with FakeTensors every such sum
    # allocates a new buffer that a CUDA run does not. These helpers find those sums (an `aten.add.Tensor` run
    # by the engine right after a node's post-hooks, while that node is still current) and hand the first
    # operand's bytes over to the result.

    def install_node_hooks(self, roots: list[Any]) -> None:
        """Hook every autograd node reachable from `roots` (their grad_fns) before the engine runs them."""
        stack = [r for r in roots if r is not None]
        nodes = self._graph_nodes
        while stack:
            node = stack.pop()
            key = id(node)
            if key in self._hooked:
                continue
            self._hooked.add(key)
            idx = len(nodes)
            nodes.append(node)  # keeps the wrapper (and so its id) alive until the backward ends
            node.register_prehook(self._make_pre_hook())
            node.register_hook(self._make_post_hook(idx))
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    stack.append(nxt)

    def _make_pre_hook(self):
        ref = weakref.ref(self)

        def pre(grad_outputs: Any) -> None:
            tr = ref()
            if tr is not None:
                tr._done_idx = None

        return pre

    def _make_post_hook(self, idx: int):
        ref = weakref.ref(self)

        def post(grad_inputs: Any, grad_outputs: Any) -> None:
            tr = ref()
            if tr is not None:
                tr._done_idx = idx

        return post

    def backward_started(self, roots: list[Any]) -> None:
        self._backward_marks.append(len(self._graph_nodes))
        self.install_node_hooks(roots)

    def backward_finished(self) -> None:
        # Drop this backward's node wrappers now: a nested (reentrant-checkpoint) graph must die when its
        # backward returns, as it does without the trace.
        mark = self._backward_marks.pop()
        for node in self._graph_nodes[mark:]:
            self._hooked.discard(id(node))
        del self._graph_nodes[mark:]
        if self._done_idx is not None and self._done_idx >= mark:
            self._done_idx = None

    def inplace_donor(self, args: Any) -> torch.Tensor | None:
        """For an `aten.add.Tensor` call: the operand a CUDA run would accumulate into in place, if any."""
        idx = self._done_idx
        if idx is None or idx >= len(self._graph_nodes) or torch.is_grad_enabled() or len(args) < 2:
            return None
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        cur = torch._C._current_autograd_node()
        if cur is None or cur is not self._graph_nodes[idx]:
            return None
        if a.shape != b.shape or a.dtype != b.dtype or not _dense(a):
            return None
        counts = (a._use_count(), torch._C._storage_Use_Count(a.untyped_storage()._cdata))
        if self._calibrating:
            self._ib_base = counts
            return None
        base = self._ib_base
        if base is None or counts[0] > base[0] or counts[1] > base[1]:
            return None
        return a

    def transfer(self, donor: torch.Tensor, out: torch.Tensor, op: str) -> None:
        """`out` takes over `donor`'s allocation (the in-place accumulation a CUDA run does)."""
        entry = self._live.get(donor.untyped_storage()._cdata)
        if entry is None or entry[0].host or entry[0].released:
            self._track_one(out, op)
            return
        old = entry[0]
        self.t += 1
        old.t_free = self.t
        old.released = True
        self.current -= old.nbytes
        self.inplace_accumulations += 1
        self._track_one(out, op, like=old)

    def calibrate(self) -> None:
        """Measure the reference counts an exclusively owned gradient shows at an InputBuffer sum (call inside
        the tracking mode): a leaf feeding two products, whose two fresh gradients meet at one input."""
        self._calibrating = True
        try:
            x = torch.empty(64, requires_grad=True)
            h = x * 2.0
            loss = (h * 3.0).sum() + (h * 5.0).sum()
            loss.backward()
            del x, h, loss
        finally:
            self._calibrating = False
        if self._ib_base is None:
            raise RuntimeError("trainfit trace: could not calibrate autograd's in-place gradient accumulation")

    # -- the mode --------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.op_count += 1
        flat, _ = tree_flatten(out)
        name = None
        for t in flat:
            if isinstance(t, torch.Tensor):
                if name is None:
                    name = func.name() if hasattr(func, "name") else str(func)
                self._track_one(t, name)
        return out

    # -- queries ---------------------------------------------------------------------------------------------
    def live_at(self, t: int) -> list[AllocRecord]:
        """Device-side records live right after event `t`."""
        return [r for r in self.records
                if not r.host and r.t_alloc <= t and (r.t_free is None or r.t_free > t)]


def tracking_fake_mode(tracker: StorageTracker):
    """A FakeTensorMode that reports every top-level op output to `tracker`.

    Equivalent to entering `tracker` (a TorchDispatchMode) inside a FakeTensorMode, with one Python mode less
    per op. Ops that FakeTensorMode runs internally (decompositions, meta implementations) are not counted:
    on the GPU they are one kernel, whose output is the only allocation the allocator sees.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    prim_device = torch.ops.prim.device.default

    class _TrackingFakeTensorMode(FakeTensorMode):
        _depth = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is prim_device:  # the autograd engine asks every tensor's device: answer without dispatch
                return args[0].fake_device
            cls = type(self)
            donor = tracker.inplace_donor(args) if (func is _ADD and cls._depth == 0) else None
            cls._depth += 1
            try:
                out = super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                cls._depth -= 1
            if cls._depth == 0:
                tracker.op_count += 1
                if donor is not None:
                    tracker.transfer(donor, out, func.name())
                    return out
                name = None
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        if name is None:
                            name = func.name()
                        tracker._track_one(t, name)
            return out

    return _TrackingFakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def tracked_backward(tracker: StorageTracker) -> Iterator[None]:
    """Route every `torch.autograd.backward` (Tensor.backward and reentrant checkpointing's nested backward use
    it) through node hooks that let the tracker see autograd's gradient sums."""
    import torch.autograd as autograd

    original = autograd.backward

    def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        tracker.backward_started([t.grad_fn for t in roots if isinstance(t, torch.Tensor)])
        try:
            return original(tensors, *args, **kwargs)
        finally:
            tracker.backward_finished()

    autograd.backward = backward
    try:
        yield
    finally:
        autograd.backward = original

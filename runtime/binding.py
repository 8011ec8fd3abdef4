"""How one ONNX Runtime session runs: ``session.run``, through an IO binding, or as CUDA graphs.

Each runner has ``run(feed) -> list of numpy outputs`` (what :class:`~.encoders.OnnxEncoders` returns).

- :class:`PlainRunner`: ``session.run`` (numpy in, numpy out; ONNX Runtime copies to and from the device).
- :class:`BoundRunner`: an ``IOBinding``: each input copied once into an ``OrtValue`` on the session's device,
  the outputs left on the device and copied back with one copy each. On the CPU it gives the same bits as
  ``session.run`` (tests/test_encoder_binding.py). With :class:`Buckets` it pads the leading axis to a bucket
  and drops the padding rows from the outputs: the shapes CUDA graphs see, testable on the CPU.
- :class:`GraphRunner`: CUDA graphs (the CUDA provider's ``enable_cuda_graph``). A graph replays fixed device
  addresses and shapes, so each graph owns its input and output ``OrtValues``, its inputs are refreshed with
  ``update_inplace`` and each run names its graph (run option ``gpu_graph_id``). Where rows along the leading
  axis are independent (the same dynamic axis 0 on every input and output: MAE's frames, a batch axis) the
  feed is padded to a power-of-two bucket up to :data:`BUCKET_CAP`, else (HuBERT's samples axis, or more rows
  than the cap) a graph is captured per exact shape, up to :data:`EXACT_GRAPHS`; other shapes run without a graph.

None of the CUDA paths has run on a GPU yet (docs/gpu.md).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import numpy as np

from ..lazy import require

log = logging.getLogger(__name__)

BUCKET_CAP = 128     # rows of the largest bucket (MAE: 4 s of faces at 30 fps fit in one)
EXACT_GRAPHS = 4     # graphs per session for shapes without a bucket; other shapes run without a graph
NO_GRAPH = "-1"      # gpu_graph_id of a run that neither captures nor replays
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def session_device(session) -> tuple:
    """(OrtValue device name, device id) of the session's first provider: ("cuda", n) or ("cpu", 0)."""
    provider = session.get_providers()[0]
    if provider in GPU_PROVIDERS:
        options = session.get_provider_options().get(provider, {})
        return "cuda", int(options.get("device_id", 0) or 0)
    return "cpu", 0


def rows_independent(session) -> bool:
    """True when every input and output has the same dynamic leading axis (MAE's frames, a batch axis): its
    rows are computed independently, so padding rows and dropping them from the outputs is exact."""
    tensors = list(session.get_inputs()) + list(session.get_outputs())
    leading = {t.shape[0] if t.shape else 1 for t in tensors}
    return len(leading) == 1 and isinstance(next(iter(leading)), str)   # one named axis (None: unnamed, unknown)


@dataclass(frozen=True)
class Buckets:
    """Powers of two along the leading axis, up to ``cap`` rows."""
    cap: int = BUCKET_CAP

    def rows(self, count: int) -> int | None:
        """The bucket holding ``count`` rows, or None above the cap."""
        if count > self.cap:
            return None
        return 1 << max(count - 1, 0).bit_length()


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with zero rows appended along axis 0 up to ``rows``."""
    if len(array) == rows:
        return array
    padded = np.zeros((rows, *array.shape[1:]), array.dtype)
    padded[:len(array)] = array
    return padded


def run_options(graph_id: str):
    ort = require("onnxruntime")
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", graph_id)
    return options


class PlainRunner:
    """``session.run``: numpy in, numpy out."""

    def __init__(self, session):
        self.session = session

    def run(self, feed: dict) -> list:
        return self.session.run(None, feed)


class BoundRunner:
    """The session through an IO binding (inputs copied once to its device, outputs copied back once each);
    with ``buckets``, padded along the leading axis when its rows are independent (else exact shapes)."""

    def __init__(self, session, buckets: Buckets | None = None, options=None):
        self.session = session
        self.device, self.device_id = session_device(session)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.buckets = buckets if buckets is not None and rows_independent(session) else None
        self.options = options            # RunOptions of every run (GraphRunner's: no graph)
        self._binding = session.io_binding()
        self._lock = threading.Lock()     # one binding, reused

    def run(self, feed: dict) -> list:
        ort = require("onnxruntime")
        count = len(feed[self.input_names[0]])
        rows = self.buckets.rows(count) if self.buckets else None
        values = [ort.OrtValue.ortvalue_from_numpy(pad_rows(feed[name], rows) if rows else feed[name], self.device,
                                                   self.device_id) for name in self.input_names]
        with self._lock:
            binding = self._binding
            for name, value in zip(self.input_names, values):
                binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, self.device, self.device_id)
            self.session.run_with_iobinding(binding, self.options)
            outputs = binding.copy_outputs_to_cpu()
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        return [o[:count] for o in outputs] if rows else outputs


class _CaptureGate:
    """Shared for runs, exclusive for a graph's first runs (ONNX Runtime captures in the second): a capture in
    CUDA's global mode fails when another thread allocates device memory meanwhile, and the branches run on a
    thread pool (runtime/stages.py)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._running = 0
        self._capturing = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing and not self._running)
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


_GATE = _CaptureGate()


class CapturedGraph:
    """One CUDA graph of a session: its own device inputs and outputs at fixed addresses and shapes.

    The first run goes without a graph and learns the output shapes; then the outputs are preallocated and
    bound, the next run with this ``graph_id`` is ONNX Runtime's regular run before capture, the one after it
    captures, and later runs replay."""

    def __init__(self, session, graph_id: int, shapes: dict, device: tuple):
        ort = require("onnxruntime")
        self.session, self.graph_id, self.device = session, graph_id, device
        self.output_names = [o.name for o in session.get_outputs()]
        self.staging = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(array, *device) for name, array in self.staging.items()}
        self.outputs = {}
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        self.options = run_options(str(graph_id))
        self.runs = 0

    def run(self, feed: dict) -> list:
        for name, array in feed.items():
            stage = self.staging[name]
            stage[:len(array)] = array
            stage[len(array):] = 0
            self.inputs[name].update_inplace(stage)
        if not self.outputs:
            return self._first_run()
        gate = _GATE.exclusive() if self.runs < 2 else _GATE.shared()
        with gate:
            self.session.run_with_iobinding(self.binding, self.options)
        self.runs += 1
        outputs = [self.outputs[name].numpy() for name in self.output_names]   # CUDA: a copy to the host
        return outputs if self.device[0] == "cuda" else [o.copy() for o in outputs]   # CPU: a view of the buffer

    def _first_run(self) -> list:
        ort = require("onnxruntime")
        for name in self.output_names:
            self.binding.bind_output(name, *self.device)
        with _GATE.shared():
            self.session.run_with_iobinding(self.binding, run_options(NO_GRAPH))
        results = self.binding.copy_outputs_to_cpu()
        self.binding.clear_binding_outputs()
        for name, result in zip(self.output_names, results):
            self.outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(result.shape), result.dtype,
                                                                           *self.device)
            self.binding.bind_ortvalue_output(name, self.outputs[name])
        return results


class GraphRunner:
    """The session (created with ``enable_cuda_graph``) as CUDA graphs: one per bucket of the leading axis
    where its rows are independent, else one per exact shape up to :data:`EXACT_GRAPHS`; a shape beyond those
    runs without a graph (logged once)."""

    def __init__(self, session, name: str, buckets: Buckets = Buckets(), _cpu_for_tests: bool = False):
        self.session, self.name = session, name
        self.device = session_device(session)
        if self.device[0] != "cuda" and not _cpu_for_tests:   # the tests run its buffers and buckets on the CPU
            raise RuntimeError(f"CUDA graphs for {name}: its session runs on {session.get_providers()[0]}")
        self.input_names = [i.name for i in session.get_inputs()]
        if any(i.type != "tensor(float)" for i in session.get_inputs()):   # the staging buffers are float32
            raise RuntimeError(f"CUDA graphs for {name}: inputs {[i.type for i in session.get_inputs()]} "
                               "are not all float32")
        self.buckets = buckets if rows_independent(session) else None
        # with another dynamic axis (HuBERT's samples) every new shape is a new graph: all of them count
        self.all_counted = any(not isinstance(d, int) for i in session.get_inputs() for d in i.shape[1:])
        self.graphs: dict = {}
        self.exact_graphs = 0
        self.without_graph = BoundRunner(session, options=run_options(NO_GRAPH))
        self._warned = False
        self._lock = threading.Lock()     # a graph's buffers are shared by its runs

    def run(self, feed: dict) -> list:
        count = len(feed[self.input_names[0]])
        rows = self.buckets.rows(count) if self.buckets else None
        key = tuple((name, (rows, *feed[name].shape[1:]) if rows else feed[name].shape) for name in self.input_names)
        with self._lock:
            graph = self.graphs.get(key) or self._new_graph(key, bucketed=rows is not None)
            if graph is None:
                with _GATE.shared():
                    return self.without_graph.run(feed)
            outputs = graph.run(feed)
        return [o[:count] for o in outputs] if rows else outputs

    def _new_graph(self, key: tuple, bucketed: bool) -> CapturedGraph | None:
        counted = self.all_counted or not bucketed
        if counted and self.exact_graphs >= EXACT_GRAPHS:
            if not self._warned:
                log.info("encoder %s: %d CUDA graphs of exact shapes captured; %s and other new shapes run "
                         "without a graph", self.name, EXACT_GRAPHS, dict(key))
                self._warned = True
            return None
        self.exact_graphs += counted
        graph = CapturedGraph(self.session, len(self.graphs) + 1, dict(key), self.device)
        self.graphs[key] = graph
        return graph

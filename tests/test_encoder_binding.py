"""The encoders' IO binding and the bucketed (padded) shapes of CUDA graphs, checked on the CPU.

On the CPU an IO binding must give the same bits as ``session.run``; padding MAE's frames to a bucket and
dropping the padding rows must give the plain rows (frames are independent in the ViT). CUDA graphs themselves
need a GPU: here only their refusal on the CPU is checked.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_emollama.branches import BRANCHES
from edge_emollama.config import load_config
from edge_emollama.errors import ConfigError
from edge_emollama.manifest import load_artifacts
from edge_emollama.runtime.binding import BoundRunner, Buckets, PlainRunner, rows_independent
from edge_emollama.runtime.encoders import OnnxEncoders


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts):
    return load_artifacts(tiny_artifacts)


def _feed(session, inputs: dict) -> dict:
    return {i.name: np.ascontiguousarray(inputs[i.name], dtype=np.float32) for i in session.get_inputs()}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_binding_gives_the_bits_of_session_run_for_every_branch(artifacts, precision):
    encoders = OnnxEncoders(artifacts, precision, threads=1, io_binding=True)
    rng = np.random.default_rng()   # fresh inputs each run
    for name, branch in BRANCHES.items():
        session = encoders.sessions[name]
        assert isinstance(encoders.runners[name], BoundRunner), name
        feed = _feed(session, branch.example_inputs(artifacts.spec, rng))
        bound, plain = encoders.run(name, feed), PlainRunner(session).run(feed)
        assert len(bound) == len(plain) == len(session.get_outputs())
        for got, want in zip(bound, plain):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert np.array_equal(got, want), f"{name} ({precision}): binding differs from session.run"


def test_binding_is_off_on_the_cpu_by_default(artifacts):
    encoders = OnnxEncoders(artifacts, "fp32", threads=1, branches=("mae",))
    assert not encoders.io_binding and isinstance(encoders.runners["mae"], PlainRunner)
    off = OnnxEncoders(artifacts, "fp32", threads=1, branches=("mae",), io_binding=False)
    assert isinstance(off.runners["mae"], PlainRunner)


@pytest.mark.parametrize("frames", [1, 3, 5, 9])
def test_bucketed_mae_frames_equal_the_plain_run(artifacts, frames):
    encoders = OnnxEncoders(artifacts, "fp32", threads=1, branches=("mae",))
    session = encoders.sessions["mae"]
    bucketed = BoundRunner(session, Buckets(cap=16))
    assert bucketed.buckets is not None, "MAE's frames axis is dynamic on its input and output"
    feed = _feed(session, BRANCHES["mae"].example_inputs(artifacts.spec, np.random.default_rng(), frames=frames))
    (want,), (got,) = PlainRunner(session).run(feed), bucketed.run(feed)
    assert got.shape == want.shape == (frames, want.shape[1])
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_buckets_are_powers_of_two_up_to_the_cap():
    buckets = Buckets(cap=16)
    assert [buckets.rows(n) for n in (1, 2, 3, 5, 9, 16, 17)] == [1, 2, 4, 8, 16, 16, None]


def test_only_a_shared_dynamic_leading_axis_is_padded(artifacts):
    encoders = OnnxEncoders(artifacts, "fp32", threads=1)
    assert rows_independent(encoders.sessions["mae"])
    for name in ("eva", "videomae", "hubert"):   # a batch axis: independent; a fixed axis 0 (older exports): not
        session = encoders.sessions[name]
        assert rows_independent(session) == isinstance(session.get_inputs()[0].shape[0], str), name


def test_cuda_graphs_are_refused_without_the_cuda_provider(artifacts):
    with pytest.raises(ConfigError, match=r"cuda_graphs: true needs the CUDA provider.*cuda_graphs: false"):
        OnnxEncoders(artifacts, "fp32", ["CPUExecutionProvider"], threads=1, cuda_graphs=True)
    with pytest.raises(ConfigError, match="io_binding is false"):
        OnnxEncoders(artifacts, "fp32", threads=1, cuda_graphs=True, io_binding=False)


def test_the_config_keys_are_validated():
    assert load_config(overrides={"runtime.encoders.io_binding": True}).runtime.encoders.io_binding is True
    with pytest.raises(ConfigError, match="runtime.encoders.io_binding.*must be bool"):
        load_config(overrides={"runtime.encoders.io_binding": "auto"})
    with pytest.raises(ConfigError, match="runtime.encoders.cuda_graphs.*must be bool"):
        load_config(overrides={"runtime.encoders.cuda_graphs": "yes"})
    with pytest.raises(ConfigError, match="io_binding is false"):
        load_config(overrides={"runtime.encoders.cuda_graphs": True, "runtime.encoders.io_binding": False})
    with pytest.raises(ConfigError, match="needs CUDAExecutionProvider"):
        load_config(overrides={"runtime.encoders.cuda_graphs": True,
                               "runtime.encoders.providers": ["CPUExecutionProvider"]})


def test_graph_buffers_buckets_and_exact_shapes_on_the_cpu(artifacts):
    """CUDA graphs' bookkeeping (fixed buffers refreshed in place, buckets, the cap on exact shapes), run on the
    CPU: the graph ids are ignored there, the outputs must still be the plain run's."""
    from edge_emollama.runtime import binding

    encoders = OnnxEncoders(artifacts, "fp32", threads=1, branches=("mae", "hubert"))
    rng = np.random.default_rng()
    mae = encoders.sessions["mae"]
    graphs = binding.GraphRunner(mae, "mae", Buckets(cap=8), _cpu_for_tests=True)
    held = []
    for frames in (1, 3, 5, 9, 3, 4, 9):   # 9 > cap: an exact-shape graph
        feed = _feed(mae, BRANCHES["mae"].example_inputs(artifacts.spec, rng, frames=frames))
        (want,), (got,) = PlainRunner(mae).run(feed), graphs.run(feed)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), frames
        held.append((got, want))
    for got, want in held:   # outputs handed out earlier are not overwritten by later runs of the same graph
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert sorted(dict(k)["faces"][0] for k in graphs.graphs) == [1, 4, 8, 9]
    assert graphs.exact_graphs == 1

    hubert = encoders.sessions["hubert"]
    graphs = binding.GraphRunner(hubert, "hubert", _cpu_for_tests=True)
    for seconds in (0.5, 0.75, 1.0, 1.25, 1.5, 0.5):   # the fifth new length goes without a graph
        feed = _feed(hubert, BRANCHES["hubert"].example_inputs(artifacts.spec, rng, seconds=seconds))
        for got, want in zip(graphs.run(feed), PlainRunner(hubert).run(feed)):
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), seconds
    assert len(graphs.graphs) == binding.EXACT_GRAPHS

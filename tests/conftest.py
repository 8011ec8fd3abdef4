"""Shared fixtures: tiny models with seeded random weights, files written in the original formats."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
REAL_VOCAB = DATA / "ggml-vocab-llama-spm.gguf"   # llama.cpp's models/ggml-vocab-llama-spm.gguf; see data/README.md


@pytest.fixture(scope="session")
def real_vocab() -> Path:
    """LLaMA-2's real vocabulary (vocab-only GGUF, no weights), kept in the repository under tests/data."""
    assert REAL_VOCAB.is_file(), f"{REAL_VOCAB} is missing: it is tracked in the repository (tests/data/README.md)"
    return REAL_VOCAB


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """The tiny preset's tokenizer: its built-in vocabulary written as a vocab-only GGUF."""
    from edge_emollama.export.gguf_writer import write_vocab_gguf
    from edge_emollama.vocab import LlamaTokenizer, tiny_vocab

    return LlamaTokenizer(write_vocab_gguf(tiny_vocab(), tmp_path_factory.mktemp("vocab") / "tiny-vocab.gguf"))


@pytest.fixture(scope="session")
def tiny_reference(tiny_tok):
    from edge_emollama.reference.synthetic import build_random
    from edge_emollama.spec import TINY

    return build_random(TINY, tiny_tok, seed=0)   # the seed of the tiny export (export.seed)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """A tiny export (quick checks only), shared by the runtime tests."""
    from edge_emollama.config import load_config
    from edge_emollama.export.pipeline import export

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    cfg = load_config(overrides={"export.out": str(out), "export.formats": ["onnx", "onnx-fp16", "gguf"],
                                 "export.quant": ["Q8_0"]})
    return export(cfg)


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory):
    from edge_emollama.tools.sample_clip import write_sample_clip

    return write_sample_clip(tmp_path_factory.mktemp("clip") / "sample.mp4", seconds=4.0)


def free_ports(count: int) -> list:
    """Ports the OS chose, all different (the sockets stay bound until every port is chosen)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def ctx():
    """A ZeroMQ context of the test's own, destroyed (sockets closed) after it."""
    import zmq

    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def endpoints():
    """Fresh loopback TCP endpoints for one test (publish, control), ports chosen by the OS."""
    publish, control = free_ports(2)
    return f"tcp://127.0.0.1:{publish}", f"tcp://127.0.0.1:{control}"


def runtime_config(artifacts, endpoints=None, *, video=None, realtime=True, **changes):
    """The runtime's configuration for a test: one thread per stage, the given sources and endpoints."""
    from edge_emollama.config import (ControlConfig, EncoderConfig, LlmConfig, PublishConfig, RuntimeConfig,
                                      SourcesConfig)

    endpoints = endpoints or ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    base = dict(artifacts=str(artifacts), sources=SourcesConfig(video=None if video is None else str(video),
                                                                realtime=realtime),
                # F16: tests compare with the reference at its tolerance (a device's default may be Q8_0)
                encoders=EncoderConfig(threads=1), llm=LlmConfig(threads=1, quant="F16"),
                publish=PublishConfig(endpoint=endpoints[0]), control=ControlConfig(endpoint=endpoints[1]))
    return RuntimeConfig(**{**base, **changes})


class Recorder:
    """A subscriber thread that keeps every message (topic, header, payload)."""

    def __init__(self, endpoint):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, "emollama.v2.")
        self.sock.connect(endpoint)
        self.messages, self._stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.3)

    def _run(self):
        while not self._stop.is_set():
            if self.sock.poll(100):
                topic, header, payload = self.sock.recv_multipart()
                self.messages.append((topic.decode(), json.loads(header), json.loads(payload)))

    def stop(self):
        time.sleep(0.3)
        self._stop.set()
        self.thread.join()
        self.sock.close(0)

    def of(self, kind):
        from edge_emollama.protocol import kind_of

        return [m for m in self.messages if kind_of(m[0]) == kind]

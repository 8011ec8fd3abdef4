"""`edge-emollama run` as a user starts it: clear errors, signals, and stages split over TCP links."""
import json
import signal
import subprocess
import sys
import time

import zmq

from edge_emollama.cli import main
from edge_emollama.runtime.control import ControlOptions
from edge_emollama.runtime.pipeline import Pipeline, RunOptions
from edge_emollama.runtime.publish import PublisherOptions

from conftest import free_port


def test_missing_camera_and_missing_source_are_one_clear_error(tiny_artifacts, capsys, endpoints):
    pub, ctl = endpoints
    code = main(["run", "--camera", "/dev/video-none", "--artifacts", str(tiny_artifacts), "--publish", pub,
                 "--control", ctl])
    err = capsys.readouterr().err
    assert code == 2 and "camera /dev/video-none could not be opened" in err and "--video" in err
    assert main(["run", "--artifacts", str(tiny_artifacts)]) == 2
    assert "no source" in capsys.readouterr().err
    assert main(["run", "--video", "x.mp4", "--link", "bogus=tcp://x", "--artifacts", str(tiny_artifacts)]) == 2
    assert "NAME=ENDPOINT" in capsys.readouterr().err


def test_sigint_stops_cleanly_with_a_final_status(tiny_artifacts, sample_clip, endpoints):
    pub, ctl = endpoints
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "emollama.v1.")
    sub.connect(pub)
    proc = subprocess.Popen([sys.executable, "-m", "edge_emollama", "run", "--video", str(sample_clip),
                             "--artifacts", str(tiny_artifacts), "--publish", pub, "--control", ctl, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        topics, deadline = [], time.monotonic() + 60
        while "emollama.v1.estimate" not in topics and time.monotonic() < deadline:
            if sub.poll(200):
                topics.append(sub.recv_multipart()[0].decode())
        assert "emollama.v1.estimate" in topics, "no estimate before the signal"
        proc.send_signal(signal.SIGINT)
        states, deadline = [], time.monotonic() + 20
        while "stopped" not in states and time.monotonic() < deadline:
            if sub.poll(200):
                topic, _, payload = sub.recv_multipart()
                if topic == b"emollama.v1.status":
                    states.append(json.loads(payload)["state"])
        assert proc.wait(timeout=20) == 0
        assert "stopped" in states
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close(0)


def test_stages_split_over_tcp_links(tiny_artifacts, sample_clip, endpoints):
    """capture+encode in one pipeline, llm+publish in another, linked by a TCP socket (as two hosts would)."""
    rows = f"tcp://127.0.0.1:{free_port()}"
    pub, ctl = endpoints
    common = dict(artifacts=str(tiny_artifacts), threads=1, reasoning=False)
    back = Pipeline(RunOptions(stages=("llm", "publish"), links={"rows": rows},
                               publisher=PublisherOptions(endpoint=pub), control=ControlOptions(endpoint=ctl),
                               lossless=True, **common)).start()
    front = Pipeline(RunOptions(stages=("capture", "encode"), video=str(sample_clip), realtime=False,
                                links={"rows": rows},
                                **common)).start()
    assert front.wait(timeout_s=90) and back.wait(timeout_s=60)
    front.close()
    back.close()
    front.raise_errors()
    back.raise_errors()
    assert back.published >= 5


def test_camera_brings_the_default_microphone_unless_told_otherwise(tiny_artifacts):
    from edge_emollama.commands import argparse_namespace, run_options
    from edge_emollama.config import Config

    def mic(**kw):
        return run_options(argparse_namespace(artifacts=str(tiny_artifacts), **kw), Config()).microphone

    assert mic(camera="0") == "default"
    assert mic(camera="0", no_mic=True) is None
    assert mic(camera="0", mic="USB") == "USB"
    assert mic(video="clip.mp4") is None

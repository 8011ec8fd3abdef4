"""`edge-emollama run` as a user starts it: clear errors, signals, and stages split over TCP links."""
import json
import signal
import subprocess
import sys
import time

import pytest
import zmq

from edge_emollama.cli import main
from edge_emollama.config import ReasoningConfig
from edge_emollama.runtime.pipeline import Pipeline

from conftest import free_port, runtime_config


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_a_signal_stops_cleanly_with_a_final_status(tiny_artifacts, sample_clip, endpoints, signum):
    pub, ctl = endpoints
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "emollama.v2.")
    sub.connect(pub)
    proc = subprocess.Popen([sys.executable, "-m", "edge_emollama", "run", "--video", str(sample_clip),
                             "--artifacts", str(tiny_artifacts), "--publish", pub, "--control", ctl, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        topics, deadline = [], time.monotonic() + 60
        while not any(t.startswith("emollama.v2.estimate.") for t in topics) and time.monotonic() < deadline:
            if sub.poll(200):
                topics.append(sub.recv_multipart()[0].decode())
        assert any(t.startswith("emollama.v2.estimate.") for t in topics), "no estimate before the signal"
        proc.send_signal(signum)
        states, deadline = [], time.monotonic() + 20
        while "stopped" not in states and time.monotonic() < deadline:
            if sub.poll(200):
                topic, _, payload = sub.recv_multipart()
                if topic == b"emollama.v2.status.":
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
    off = ReasoningConfig(enabled=False)
    back = Pipeline(runtime_config(tiny_artifacts, endpoints, stages=["llm", "publish"], links={"rows": rows},
                                   reasoning=off), lossless=True).start()
    front = Pipeline(runtime_config(tiny_artifacts, video=sample_clip, realtime=False, stages=["capture", "encode"],
                                    links={"rows": rows}, reasoning=off)).start()
    assert front.wait(timeout_s=90) and back.wait(timeout_s=60)
    front.close()
    back.close()
    front.raise_errors()
    back.raise_errors()
    assert back.published >= 5


def test_camera_brings_the_default_microphone_unless_told_otherwise():
    from edge_emollama.cli import build_parser, overrides
    from edge_emollama.commands import sources_of
    from edge_emollama.config import load_config

    def mic(*argv):
        args = build_parser().parse_args(["run", *argv])
        args.settings = overrides(args)
        return sources_of(args, load_config(overrides=args.settings).runtime).microphone

    assert mic("--camera", "0") == "default"
    assert mic("--camera", "0", "--no-mic") is None
    assert mic("--camera", "0", "--mic", "USB") == "USB"
    assert mic("--video", "clip.mp4") is None


def test_an_internal_error_is_not_bad_input(monkeypatch, capsys, tmp_path):
    """A bug exits 1 as an internal error: one line (and the hint) without -v, the traceback with -v and in the
    --log file; bad input stays exit 2 with one line."""
    from edge_emollama import commands

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(commands, "listen", bug)
    assert main(["listen", "tcp://127.0.0.1:1", "--timeout", "0.1", "--log", str(tmp_path / "run.log")]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: division by zero" in err and "rerun with -v" in err
    assert "Traceback" not in err and "Traceback" in (tmp_path / "run.log").read_text()
    assert main(["listen", "tcp://127.0.0.1:1", "-v"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_global_options_before_or_after_the_subcommand(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime:\n  fusion:\n    method: kalman\n")
    for argv in (["--config", str(bad), "listen", "--timeout", "0.1"], ["listen", "--timeout", "0.1", "--config", str(bad)]):
        assert main(argv) == 2
        assert "runtime.fusion.method = 'kalman'" in capsys.readouterr().err


def test_explain_honours_its_timeout(capsys):
    pub, ctl = free_port(), free_port()
    start = time.monotonic()
    code = main(["explain", "--control", f"tcp://127.0.0.1:{ctl}", "--publish", f"tcp://127.0.0.1:{pub}",
                 "--timeout", "1"])
    assert code == 2 and time.monotonic() - start < 2.0
    assert "no reply from the control socket" in capsys.readouterr().err


def test_a_quiet_file_run_shows_its_progress_and_a_loud_one_names_each_person(tiny_artifacts, sample_clip, endpoints,
                                                                               capsys):
    pub, ctl = endpoints
    args = ["run", "--video", f"solo={sample_clip}", "--fast", "--artifacts", str(tiny_artifacts), "--publish", pub,
            "--control", ctl]
    assert main(args + ["--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"run {sample_clip.name}: 5/5 windows in" in err   # 4 s clip, W 2 s, H 0.5 s
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.split()[2] == "solo/face-1" for line in lines)


def test_explain_person_is_source_slash_face(capsys):
    from edge_emollama.commands import _person

    assert _person("hall/face-12") == ("hall", 12) and _person("hall/scene") == ("hall", None)
    assert _person(None) is None
    assert main(["explain", "--person", "hall-1", "--timeout", "0.1"]) == 2
    assert "SOURCE/face-ID" in capsys.readouterr().err


def test_demo_redoes_a_tiny_export_an_older_version_wrote(tiny_artifacts, tmp_path, sample_clip, endpoints):
    """A developer's artifacts/tiny from before a manifest change: the demo re-exports it instead of refusing
    (an older manifest anywhere else is refused with the fix: tests/test_manifest.py)."""
    import shutil

    from edge_emollama.manifest import MANIFEST, VERSION, load_artifacts

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "version": VERSION - 1}))
    pub, ctl = endpoints
    assert main(["demo", "--artifacts", str(folder), "--clip", str(sample_clip), "--publish", pub,
                 "--control", ctl]) == 0
    assert load_artifacts(folder).manifest.version == VERSION

"""The outputs besides the PUB socket (runtime/outputs.py) on a real Publisher: the JSONL recording, a real LSL
inlet, a \\psi subscriber, a failing sink; and `edge-emollama report` on a recording."""
import json
import time
from datetime import datetime, timezone

import numpy as np
import pytest
import zmq

from edge_emollama.cli import main
from edge_emollama.config import OutputsConfig, PublishConfig
from edge_emollama.errors import InputError
from edge_emollama.lazy import available
from edge_emollama.protocol import kind_of, message_errors
from edge_emollama.runtime.clock import now_ns
from edge_emollama.runtime.fusion import Fusion
from edge_emollama.runtime.outputs import (LSL_TYPE, LslOutlet, PsiPublisher, Recorder, anchor_of, make_sinks,
                                           read_recording)
from edge_emollama.runtime.publish import Publisher
from edge_emollama.spec import LABELS

S = 1_000_000_000
HOP_S = 0.5
needs_lsl = pytest.mark.skipif(not available("pylsl"), reason='pylsl is not installed: pip install -e ".[lsl]"')


def presence(face: bool) -> dict:
    return {"video": {"present": True}, "face": {"present": face, "fraction": 1.0 if face else 0.0},
            "audio": {"present": True, "active": True, "rms": 0.05, "coverage": 1.0}}


def publish_windows(pub: Publisher, n: int, stream=("default", None)) -> list:
    """``n`` estimates one hop apart (the face leaves halfway), with their events; their (t0, t1) windows."""
    fusion, rng, windows = Fusion(), np.random.default_rng(0), []
    t = now_ns() - 3 * S
    for k in range(n):
        face = k < n // 2
        t0, t1 = t + int(k * HOP_S * S), t + 2 * S + int(k * HOP_S * S)
        est = fusion.update(rng.random(len(LABELS)), t0, t1, {"video": True, "face": face, "audio": True})
        assert pub.publish_estimate(est, presence(face), {"window_ms": 1.5, "llm_ms": 20.0}, k, "ema",
                                    stream=stream, box=None if stream[1] is None else [1, 2, 30, 40])
        for event in est.events:
            assert pub.publish_event(event, (t0, t1), stream)
        windows.append((t0, t1))
    return windows


def publisher(sinks, status_interval_s: float = 0.2) -> Publisher:
    return Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=status_interval_s),
                     sinks=sinks).start()


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_the_recording_round_trips_every_message_and_is_partial_until_closed(tmp_path):
    path = tmp_path / "session.jsonl"
    recorder = Recorder(path)
    pub = publisher([recorder])
    try:
        publish_windows(pub, 8)
        assert wait_for(lambda: recorder.lines >= 8)
        assert recorder.partial.is_file() and not path.exists()
        lines = read_recording(recorder.partial)   # a crashed run's recording is readable as it is
        assert len(lines) == recorder.lines
    finally:
        pub.close()
    assert path.is_file() and not recorder.partial.exists()
    messages = read_recording(path)
    topics = [m["topic"] for m in messages]
    assert sum(kind_of(t) == "estimate" for t in topics) == 8 and any(kind_of(t) == "event" for t in topics)
    assert messages[-1]["topic"] == "emollama.v2.status." and messages[-1]["payload"]["state"] == "stopped"
    for message in messages:
        assert message_errors(message["topic"], message["header"], message["payload"]) == []
    assert messages[-2:] == [json.loads(line) for line in path.read_text().splitlines()[-2:]]
    assert [m["header"]["seq"] for m in messages if kind_of(m["topic"]) == "estimate"] == list(range(8))


def test_the_recording_refuses_an_unwritable_folder_and_an_existing_file(tmp_path):
    with pytest.raises(InputError, match="cannot write the recording in .*missing.*--record FILE"):
        Recorder(tmp_path / "missing" / "s.jsonl")
    (tmp_path / "done.jsonl").write_text("")
    with pytest.raises(InputError, match="already exists"):
        Recorder(tmp_path / "done.jsonl")


def test_a_cut_off_last_line_is_skipped_and_damage_elsewhere_is_named(tmp_path):
    good = json.dumps({"topic": "emollama.v2.status.", "header": {}, "payload": {}})
    (tmp_path / "cut.jsonl.partial").write_text(f"{good}\n{good}\n{good[:20]}")
    assert len(read_recording(tmp_path / "cut.jsonl.partial")) == 2
    (tmp_path / "bad.jsonl").write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(InputError, match="line 2 is not JSON"):
        read_recording(tmp_path / "bad.jsonl")


class Exploding:
    name = "exploding"

    def __init__(self, after: int):
        self.after, self.calls, self.closed = after, 0, False

    def __call__(self, topic, head, payload):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("disk on fire")

    def close(self):
        self.closed = True


def test_a_failing_sink_is_logged_counted_and_disabled_while_the_publisher_goes_on(tmp_path, caplog):
    bad, recorder = Exploding(after=2), Recorder(tmp_path / "s.jsonl")
    pub = publisher([bad, recorder])
    try:
        publish_windows(pub, 6)
        assert wait_for(lambda: pub.latest("estimate") and pub.latest("estimate")["header"]["seq"] == 5)
        assert bad.calls == 3 and bad.closed and pub.failed_sinks == ["exploding"]
        status = pub.tracker.snapshot()
        assert status["counters"]["errors"] == 1 and status["last_error"]["stage"] == "output exploding"
        assert status["state"] != "error"
        pub.check()   # the sender thread did not fail
    finally:
        pub.close()
    assert "output exploding failed and is disabled" in caplog.text and "disk on fire" in caplog.text
    assert "Traceback" in caplog.text
    assert sum(kind_of(m["topic"]) == "estimate" for m in read_recording(tmp_path / "s.jsonl")) == 6


def test_psi_subscriber_gets_two_frames_with_the_iso_originating_time():
    psi = PsiPublisher("tcp://127.0.0.1:*")
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(psi.endpoint)
    pub = publisher([psi], status_interval_s=0.05)
    try:
        got = []
        assert wait_for(lambda: sub.poll(50) and bool(got.append(sub.recv_multipart()) or got))   # joined
        windows = publish_windows(pub, 4)
        deadline = time.monotonic() + 5
        while sum(kind_of(f[0].decode()) == "estimate" for f in got) < 4 and time.monotonic() < deadline:
            if sub.poll(100):
                got.append(sub.recv_multipart())
        anchor = anchor_of(pub.latest("estimate")["header"]["clock"])
    finally:
        pub.close()
        sub.close(0)
    assert all(len(frames) == 2 for frames in got)
    estimates = [json.loads(f[1]) for f in got if kind_of(f[0].decode()) == "estimate"]
    assert [e["message"]["window_index"] for e in estimates] == [0, 1, 2, 3]
    assert [e["originatingTime"] for e in estimates] == [anchor.to_utc_iso(t1) for _, t1 in windows]
    parsed = datetime.strptime(estimates[0]["originatingTime"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(parsed.timestamp() - (time.time() - 3 + 2)) < 5   # the window ended about a second ago
    statuses = [json.loads(f[1]) for f in got if kind_of(f[0].decode()) == "status"]
    assert statuses and all(s["originatingTime"].endswith("Z") and "state" in s["message"] for s in statuses)


@needs_lsl
def test_an_lsl_inlet_receives_the_smoothed_estimates_stamped_at_the_window_end():
    import pylsl

    assert abs(pylsl.local_clock() - time.monotonic()) < 0.01   # both CLOCK_MONOTONIC here
    stream_id = f"test-{time.monotonic_ns()}"
    outlet = LslOutlet(LABELS, HOP_S, stream_id)
    pub = publisher([outlet])
    try:
        publish_windows(pub, 1, ("cam", 2))   # a person's outlet opens at their first estimate
        found = [s for s in pylsl.resolve_byprop("source_id", f"{stream_id}/cam/face-2", timeout=5.0)
                 if s.type() == LSL_TYPE]
        assert found, "the outlet was not found on the local network"
        assert found[0].name() == "edge-emollama cam face-2"
        inlet = pylsl.StreamInlet(found[0])
        info = inlet.info(timeout=5.0)
        assert info.type() == LSL_TYPE and info.channel_count() == len(LABELS)
        assert info.nominal_srate() == pytest.approx(1 / HOP_S)
        channel, labels = info.desc().child("channels").child("channel"), []
        while not channel.empty():
            labels.append(channel.child_value("label"))
            channel = channel.next_sibling()
        assert labels == list(LABELS)
        inlet.open_stream(timeout=5.0)
        windows = publish_windows(pub, 5, ("cam", 2))
        publish_windows(pub, 2, ("cam", 3))   # another person: an outlet of their own
        samples = []
        deadline = time.monotonic() + 5
        while len(samples) < 5 and time.monotonic() < deadline:
            sample, stamp = inlet.pull_sample(timeout=0.5)
            if sample is not None:
                samples.append((sample, stamp))
        inlet.close_stream()
        assert pylsl.resolve_byprop("source_id", f"{stream_id}/cam/face-3", timeout=5.0)
    finally:
        pub.close()
    assert len(samples) == 5
    for (sample, stamp), (_, t1) in zip(samples, windows):
        assert len(sample) == len(LABELS) and sum(sample) == pytest.approx(1.0, abs=1e-5)
        assert abs(stamp - t1 / 1e9) < 0.005
    assert outlet.pushed == 8


@needs_lsl
def test_make_sinks_builds_what_the_configuration_asks_and_lsl_is_found_by_type(tmp_path):
    import pylsl

    sinks = make_sinks(OutputsConfig(record=str(tmp_path / "r.jsonl"), lsl=True, psi="tcp://127.0.0.1:*"),
                       LABELS, HOP_S, stream_id="make-sinks-test")
    assert [type(s) for s in sinks] == [Recorder, LslOutlet, PsiPublisher]
    pub = publisher(sinks)
    try:
        publish_windows(pub, 1)
        found = pylsl.resolve_byprop("source_id", "make-sinks-test/default/scene", timeout=5.0)
        assert [s.type() for s in found] == [LSL_TYPE]
    finally:
        pub.close()
    assert (tmp_path / "r.jsonl").is_file()
    with pytest.raises(InputError, match="cannot write"):
        make_sinks(OutputsConfig(record=str(tmp_path / "no" / "r.jsonl")), LABELS, HOP_S)


def test_report_of_a_recorded_run_is_a_png_and_an_html(tiny_artifacts, sample_clip, tmp_path, endpoints):
    pub, ctl = endpoints
    session = tmp_path / "session.jsonl"
    assert main(["run", "--video", str(sample_clip), "--fast", "--artifacts", str(tiny_artifacts), "--publish", pub,
                 "--control", ctl, "--quiet", "--record", str(session)]) == 0
    messages = read_recording(session)
    estimates = [m for m in messages if kind_of(m["topic"]) == "estimate"]
    assert estimates and all(message_errors(m["topic"], m["header"], m["payload"]) == [] for m in messages)
    assert main(["report", str(session), "--out", str(tmp_path / "report.png")]) == 0
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert main(["report", str(session), "--out", str(tmp_path / "report.html"), "--utc"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and f"<td>{len(estimates)}</td>" in page
    assert main(["report", str(session), "--out", str(tmp_path / "report.pdf")]) == 2

"""The publisher on real sockets: framing, strict JSON, seq, schema, status, never blocking; and listen."""
import io
import json
import math
import re
import threading
import time

import numpy as np
import pytest
import zmq

from edge_emollama.errors import ConfigError, InputError
from edge_emollama.runtime.clock import ClockAnchor, now_ns
from edge_emollama.runtime.fusion import Fusion
from edge_emollama.cli import main
from edge_emollama.client import listen
from edge_emollama.config import HeartbeatConfig, PublishConfig
from edge_emollama.protocol import (DEFAULT_SOURCE, TOPICS, decode_message, header as make_header, kind_of, load_schema,
                                    message_errors, set_heartbeats, topic_of)
from edge_emollama.runtime.publish import Publisher, StatusTracker
from edge_emollama.spec import LABELS

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
S = 1_000_000_000


def presence(face=True, audio=True):
    return {"video": {"present": True}, "face": {"present": face, "fraction": 1.0 if face else 0.0},
            "audio": {"present": audio, "active": True, "rms": 0.05 if audio else 0.0, "coverage": 1.0}}


def strict_loads(data: bytes):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(data, parse_constant=refuse)


def subscriber(ctx, endpoint, topic=b"emollama.v2.", rcvhwm=1000):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def wait_joined(pub: Publisher, sub, timeout_s=5.0):
    """Slow-joiner handshake: wait until the subscriber sees the (immediate, then periodic) status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sub.poll(100):
            sub.recv_multipart()
            return
    raise AssertionError("subscriber never received a status message")


def drain(sub, until_s=1.0):
    out = []
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        if sub.poll(50):
            out.append(sub.recv_multipart())
    return out


def publish_windows(pub: Publisher, n: int, face=True, audio=True):
    fusion = Fusion()
    rng = np.random.default_rng(0)
    t = now_ns() - 3 * S
    for k in range(n):
        est = fusion.update(rng.random(len(LABELS)), t + k * S // 2, t + 2 * S + k * S // 2,
                            presence(face, audio))
        assert pub.publish_estimate(est, presence(face, audio), {"window_ms": 1.5, "llm_ms": 20.0}, k, "ema")
        for event in est.events:
            assert pub.publish_event(event, (est.t0_ns, est.t1_ns))


def test_topics_are_dotted_versioned_and_prefix_free():
    kinds = list(TOPICS.values())
    assert len(set(kinds)) == len(kinds)
    for a in kinds:
        assert re.fullmatch(r"emollama\.v2\.[a-z]+\.", a)
        for b in kinds:
            assert a == b or not b.startswith(a), f"{a} is a prefix of {b}"
    people = [topic_of(kind, s, f) for kind in ("estimate", "event") for s in ("a", "a1") for f in (None, 1, 11)]
    for a in people:   # a person's topic is a prefix of nothing but itself
        assert sum(b.startswith(a) for b in people) == 1, a
    pattern = re.compile(load_schema()["$defs"]["header"]["properties"]["topic"]["pattern"])
    assert all(pattern.match(t) for t in people + [TOPICS["status"], TOPICS["reason"]])
    assert not pattern.match(TOPICS["estimate"]) and not pattern.match("emollama.v2.estimate.a.face-1")


def test_messages_are_strict_valid_and_sequenced(ctx):
    with Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.2), context=ctx) as pub:
        sub = subscriber(ctx, pub.endpoint)
        wait_joined(pub, sub)
        publish_windows(pub, 12, face=False)
        messages = drain(sub, 1.0)
    seqs, streams = {}, set()
    kinds = {"estimate": 0, "event": 0, "status": 0}
    for frames in messages:
        assert len(frames) == 3
        topic = frames[0].decode()
        header, payload = strict_loads(frames[1]), strict_loads(frames[2])
        assert message_errors(topic, header, payload) == []
        assert header["topic"] == topic and header["schema_version"] == "2.0.0"
        assert header["schema"] == "emollama." + kind_of(topic)
        streams.add(header["stream_id"])
        seqs.setdefault(topic, []).append(header["seq"])
        kinds[kind_of(topic)] += 1
        if kind_of(topic) == "estimate":
            window = header["window"]
            assert window["t1_ns"] - window["t0_ns"] == 2 * S
            assert math.isclose(payload["latency_ms"], (header["publish_ns"] - window["t1_ns"]) / 1e6, abs_tol=1e-3)
            assert math.isclose(sum(payload["probabilities"]), 1.0, abs_tol=1e-9)
            assert math.isclose(sum(payload["smoothed"]), 1.0, abs_tol=1e-9)
            assert payload["presence"]["face"] == {"present": False, "fraction": 0.0}  # absence stated
            assert payload["labels"] == list(LABELS)
    assert len(streams) == 1 and UUID4.match(streams.pop())
    assert kinds["estimate"] == 12 and kinds["event"] >= 1 and kinds["status"] >= 2
    for topic, seq in seqs.items():
        assert all(b > a for a, b in zip(seq, seq[1:])), topic
    assert seqs[topic_of("estimate", DEFAULT_SOURCE, None)] == list(range(12))
    # one anchor per run, in every header
    anchors = {json.dumps(strict_loads(f[1])["clock"], sort_keys=True) for f in messages}
    assert len(anchors) == 1


def test_status_about_every_interval_and_final_stopped(ctx):
    pub = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.1), context=ctx).start()
    sub = subscriber(ctx, pub.endpoint, topic=TOPICS["status"].encode())
    wait_joined(pub, sub)
    start = time.monotonic()
    got = drain(sub, 0.65)
    elapsed = time.monotonic() - start
    pub.close()
    final = drain(sub, 0.3)
    assert 0.5 * elapsed / 0.1 <= len(got) <= 1.5 * elapsed / 0.1 + 1
    last = decode_message(final[-1])
    assert last[2]["state"] == "stopped" and message_errors(*last) == []


def test_slow_subscriber_never_blocks(ctx):
    opts = PublishConfig(endpoint="tcp://127.0.0.1:*", sndhwm=4, status_interval_s=0.5)
    with Publisher(opts, context=ctx) as pub:
        lazy = subscriber(ctx, pub.endpoint, rcvhwm=4)  # connected, subscribed, never reads
        wait_joined(pub, lazy)
        est = Fusion().update(np.ones(len(LABELS)), 0, 2 * S)
        start = time.monotonic()
        accepted = 0
        for k in range(10_000):
            accepted += pub.publish_estimate(est, presence(), {}, k, "ema")
        took = time.monotonic() - start
        assert took < 10.0, f"publishing 10000 messages took {took:.1f} s"
        deadline = time.monotonic() + 5.0
        while pub._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub._queue.qsize() == 0, "the sender thread is stuck behind a subscriber that does not read"
        # publish() never waits: what the queue cannot take is counted as dropped, the rest is sent
        assert accepted >= opts.queue_size and pub.latest()["header"]["seq"] == accepted - 1
        assert pub.tracker.snapshot()["counters"]["send_dropped"] == 10_000 - accepted
        # the publisher still serves a fresh subscriber
        fresh = subscriber(ctx, pub.endpoint)
        wait_joined(pub, fresh)   # joined (a fixed sleep lost the one message on a loaded machine)
        pub.publish_estimate(est, presence(), {}, 10_001, "ema")
        topic = None
        deadline = time.monotonic() + 2.0
        while kind_of(topic or "") != "estimate" and time.monotonic() < deadline:
            assert fresh.poll(max(1, int(1000 * (deadline - time.monotonic())))), \
                "a new subscriber got nothing after the flood"
            topic, header, payload = decode_message(fresh.recv_multipart())
        assert header["seq"] == accepted and message_errors(topic, header, payload) == []


def test_bad_payloads_fail_in_the_caller(ctx):
    with Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*"), context=ctx) as pub:
        with pytest.raises(InputError, match="strict JSON"):
            pub.publish("event", {"kind": "error", "t_ns": 1, "stage": "x", "message": float("nan")})
        with pytest.raises(InputError, match="unknown message kind"):
            pub.publish("estimates", {})
        with pytest.raises(InputError, match="capture window"):
            pub.publish("estimate", {})
        assert pub.publish("event", {"kind": "error", "t_ns": 1, "stage": "encoders", "message": "ok"})
        assert pub.error is None
    with pytest.raises(ConfigError, match="before start"):
        Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*"), context=ctx).publish("event", {})


def test_start_twice_is_one_sender(ctx):
    """Publisher(...).start() then `with` (which starts too): one sender thread, whole messages only."""
    with Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.02), context=ctx).start() as pub:
        sender = pub._thread
        assert pub.start() is pub and pub._thread is sender
        sub = subscriber(ctx, pub.endpoint)
        frames = [sub.recv_multipart() for _ in range(20) if sub.poll(2000)]
        sub.close(0)
    assert len(frames) == 20 and all(len(f) == 3 for f in frames)


def test_bind_conflict_is_a_config_error(ctx):
    with Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*"), context=ctx) as first:
        with pytest.raises(ConfigError, match="cannot bind"):
            Publisher(PublishConfig(endpoint=first.endpoint), context=ctx).start()


def test_heartbeats_are_set(ctx):
    with Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", heartbeat=HeartbeatConfig(ivl_ms=700)), context=ctx) as pub:
        assert pub._socket.getsockopt(zmq.HEARTBEAT_IVL) == 700
        assert pub._socket.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 3000
        assert pub._socket.getsockopt(zmq.SNDHWM) == 16
    sock = ctx.socket(zmq.SUB)
    set_heartbeats(sock, HeartbeatConfig(500, 1500, 2000))
    assert (sock.getsockopt(zmq.HEARTBEAT_IVL), sock.getsockopt(zmq.HEARTBEAT_TTL)) == (500, 2000)
    sock.close(0)


def test_status_states():
    tracker = StatusTracker(stall_s=0.05)
    assert tracker.snapshot()["state"] == "starting"
    time.sleep(0.07)
    assert tracker.snapshot()["state"] == "degraded"
    for face, audio, state in [(True, True, "running"), (False, True, "no_face"), (True, False, "no_audio"),
                               (False, False, "no_input")]:
        tracker.record_sent("estimate", 3, {"latency_ms": 12.0, "presence": presence(face, audio)}, now_ns())
        snap = tracker.snapshot()
        assert snap["state"] == state and message_errors(TOPICS["status"], _header("status"), snap) == []
    time.sleep(0.07)
    assert tracker.snapshot()["state"] == "degraded"
    tracker.record_sent("estimate", 4, {"latency_ms": 12.0, "presence": presence()}, now_ns())
    tracker.record_dropped_windows(2)
    snap = tracker.snapshot()
    assert snap["state"] == "degraded" and snap["counters"]["dropped_windows"] == 2
    tracker.record_error("llm", RuntimeError("boom"), fatal=True)
    assert tracker.snapshot()["state"] == "error" and tracker.snapshot()["last_error"]["stage"] == "llm"
    tracker.mark_stopped()
    assert tracker.snapshot()["state"] == "stopped"


EVENT_TOPIC = topic_of("event", "cam", 1)


def _header(kind, source="cam", face_id=1):
    return make_header(kind, "0b3e1a52-6a0f-4c1e-9d55-3f0e7d0c2a11", 0, None, now_ns(), ClockAnchor.take().to_dict(),
                  source, face_id)


def test_schema_rejects_what_it_should():
    payload = {"kind": "presence_changed", "t_ns": 5, "modality": "face", "present": False}
    assert message_errors(EVENT_TOPIC, _header("event"), payload) == []
    assert message_errors(EVENT_TOPIC, _header("event"), {**payload, "present": None})
    assert message_errors(EVENT_TOPIC, _header("status"), payload)  # schema name must match the topic
    assert message_errors(EVENT_TOPIC, _header("event", face_id=2), payload)  # the topic names the person
    assert message_errors("emollama.v2.estimates.", _header("event"), payload)
    bad_header = {**_header("event"), "seq": -1}
    assert message_errors(EVENT_TOPIC, bad_header, payload)
    no_window = _header("estimate")  # an estimate must name its window
    assert any("window" in e or "None" in e for e in message_errors(no_window["topic"], no_window, {}))


def test_listen_validates_and_prints(ctx):
    with Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.1), context=ctx) as pub:
        out, err, result = io.StringIO(), io.StringIO(), {}
        thread = threading.Thread(target=lambda: result.update(r=listen(
            pub.endpoint, count=5, timeout=10.0, show_status=True, out=out, err=err, context=ctx)))
        thread.start()
        time.sleep(0.5)
        publish_windows(pub, 8)
        thread.join(12.0)
    r = result["r"]
    assert r.estimates == 5 and r.invalid == 0 and r.gaps == 0 and not r.timed_out, err.getvalue()
    lines = out.getvalue().splitlines()
    assert sum(" latency=" in line and "face=yes" in line for line in lines) == 5
    assert any("event dominant_changed" in line for line in lines)
    assert any(" status " in line for line in lines)


def test_listen_reports_invalid_messages_and_gaps(ctx):
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    good = {"kind": "error", "t_ns": 1, "stage": "x", "message": "y"}

    def send():
        time.sleep(0.4)
        for seq in (0, 2):
            raw.send_multipart([EVENT_TOPIC.encode(), json.dumps({**_header("event"), "seq": seq}).encode(),
                                json.dumps(good).encode()])
        raw.send_multipart([EVENT_TOPIC.encode(), b"{'not': json}", b"{}"])
        raw.send_multipart([EVENT_TOPIC.encode(), json.dumps(_header("event")).encode(), b'{"kind": 1}'])
    thread = threading.Thread(target=send)
    thread.start()
    err = io.StringIO()
    r = listen(endpoint, count=None, timeout=1.2, out=io.StringIO(), err=err, context=ctx)
    thread.join()
    raw.close(0)
    assert r.messages == 4 and r.invalid == 2 and r.gaps == 1 and r.timed_out
    assert "INVALID" in err.getvalue()


def test_listen_main_exit_codes(ctx, capsys):
    raw = ctx.socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    assert main(["listen", f"tcp://127.0.0.1:{port}", "--timeout", "0.3"]) == 2  # nothing arrived
    raw.close(0)


def test_listen_ends_when_the_runtime_stops(ctx):
    """Without a count or a timeout, listen returns on the runtime's final 'stopped' status instead of
    waiting forever for a runtime that is gone."""
    pub = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.1), context=ctx).start()
    out, err, result = io.StringIO(), io.StringIO(), {}
    thread = threading.Thread(target=lambda: result.update(r=listen(pub.endpoint, show_status=True, out=out,
                                                                   err=err, context=ctx)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while "status" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.close()
    thread.join(5)
    assert not thread.is_alive() and result["r"].stopped and not result["r"].timed_out
    assert "the runtime stopped" in err.getvalue()

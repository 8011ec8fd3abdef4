"""The integrator's client (edge_emollama.client) on real sockets, against the runtime's own publisher and
control socket: typed records, latest(), gaps, restarts, invalid messages, Control and its errors, the
asyncio variants, and listen --json. Every wait is bounded."""
import asyncio
import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import zmq

from edge_emollama.cli import main
from edge_emollama.client import (AsyncControl, AsyncSubscriber, Control, ControlError, Estimate, Event, Reason,
                                  Status, Subscriber, from_message, subscription_prefixes)
from edge_emollama.config import ControlConfig, PublishConfig
from edge_emollama.errors import ConfigError, InputError
from edge_emollama.protocol import TOPICS, encode_message, header, message_errors
from edge_emollama.runtime.clock import now_ns
from edge_emollama.runtime.control import ControlServer
from edge_emollama.runtime.fusion import Fusion
from edge_emollama.runtime.publish import Publisher
from edge_emollama.spec import LABELS

S = 1_000_000_000
DEAD = "tcp://127.0.0.1:9"   # nothing listens on the discard port


def presence(face=True):
    return {"video": {"present": True}, "face": {"present": face, "fraction": 1.0 if face else 0.0},
            "audio": {"present": True, "active": True, "rms": 0.05, "coverage": 1.0}}


def publish_windows(pub: Publisher, n: int, first_index: int = 0, subtitle: str | None = None) -> None:
    fusion, rng, t = Fusion(), np.random.default_rng(first_index), now_ns() - 3 * S
    for k in range(first_index, first_index + n):
        fused = fusion.update(rng.random(len(LABELS)), t + k * S // 2, t + 2 * S + k * S // 2, presence())
        assert pub.publish_estimate(fused, presence(), {"window_ms": 1.5, "llm_ms": 20.0}, k, "ema",
                                    subtitle=subtitle)
        for event in fused.events:
            pub.publish_event(event, (fused.t0_ns, fused.t1_ns))


@pytest.fixture
def pub(ctx):
    publisher = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.2), context=ctx).start()
    yield publisher
    publisher.close()


@pytest.fixture
def served(pub):
    server = ControlServer.for_publisher(pub, ControlConfig(endpoint="tcp://127.0.0.1:*")).start()
    yield pub, server
    server.close()
    assert server.error is None


def joined(sub: Subscriber, timeout_s: float = 5.0) -> Status:
    """Slow joiner: wait for the publisher's periodic status, so later messages are not sent before the
    subscription took."""
    deadline = time.monotonic() + timeout_s
    while (record := sub.recv(max(0.01, deadline - time.monotonic()))) is not None:
        if isinstance(record, Status):
            return record
    raise AssertionError("no status arrived: the subscriber never joined")


def drain(sub: Subscriber, seconds: float) -> list:
    """Every record within ``seconds`` (iteration alone would not end: statuses keep coming)."""
    deadline, out = time.monotonic() + seconds, []
    while (left := deadline - time.monotonic()) > 0:
        if (record := sub.recv(left)) is not None:
            out.append(record)
    return out


def first(sub, kind, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while (record := sub.recv(max(0.01, deadline - time.monotonic()))) is not None:
        if isinstance(record, kind):
            return record
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


def test_typed_estimates_events_and_latest(pub, ctx):
    with Subscriber(pub.endpoint, ("estimate", "event", "status"), context=ctx, timeout_s=0.5) as sub:
        assert sub.latest() is None
        status = joined(sub)
        assert status.stream_id == pub.stream_id and status.t0_ns is None and status.counters["estimates"] == 0
        publish_windows(pub, 3, subtitle="hello there")
        est = first(sub, Estimate)
        assert est.labels == LABELS and est.window_index == 0 and est.seq == 0 and est.gap == 0
        assert abs(sum(est.probabilities) - 1) < 1e-6 and abs(sum(est.smoothed) - 1) < 1e-6
        assert est.dominant_label in LABELS and est.probability(est.dominant_label) == est.dominant_probability
        assert est.presence.face and est.presence.face_fraction == 1.0 and est.presence.audio_coverage == 1.0
        assert est.t1_ns - est.t0_ns == 2 * S and est.publish_ns >= est.t1_ns and est.latency_ms > 0
        assert est.subtitle == "hello there" and est.timings_ms["llm_ms"] == 20.0 and est.smoothing == "ema"
        assert abs(est.utc(est.t1_ns) - datetime.now(timezone.utc)) < timedelta(seconds=10)
        with pytest.raises(InputError, match="did you mean 'happy'"):
            est.probability("hapy")
        time.sleep(0.3)
        newest = sub.latest()
        assert isinstance(newest, Estimate) and newest.window_index == 2 and newest.seq == 2
        assert isinstance(sub.latest("event"), Event) and sub.latest("event").event == "dominant_changed"
        assert sub.latest("reason") is None and sub.gaps == 0 and sub.invalid == 0
        assert sub.connected and sub.reconnects == 0
        with pytest.raises(InputError, match="unknown kind"):
            sub.latest("estimates")


def test_iteration_ends_after_the_timeout(pub, ctx):
    with Subscriber(pub.endpoint, "estimate", context=ctx, timeout_s=0.3) as sub:
        started = time.monotonic()
        assert list(sub) == []
        assert time.monotonic() - started < 2.0


def test_topics_are_kinds_names_or_prefixes():
    assert subscription_prefixes(("estimate", "emollama.v2.")) == ("emollama.v2.estimate.", "emollama.v2.")
    with pytest.raises(InputError, match="did you mean 'estimate'"):
        subscription_prefixes(("estimat",))
    with pytest.raises(InputError, match="at least one"):
        subscription_prefixes(())


def raw_message(stream_id: str, seq: int, kind="status", payload=None) -> list:
    """A schema-valid message of the wire protocol, sent by hand (to control the seq)."""
    payload = payload or {"state": "running", "reasons": [], "uptime_s": 1.0, "rates_hz": {"estimates": 2.0},
                          "latency_ms": None, "presence": None, "last_error": None, "last_estimate_seq": None,
                          "tracks": [],
                          "counters": {"estimates": 0, "events": 0, "reasons": 0, "dropped_windows": 0,
                                       "send_dropped": 0, "errors": 0}}
    clock = {"monotonic_ns": 1000, "utc": "2026-12-01T10:00:00.000000Z"}
    return encode_message(header(kind, stream_id, seq, None, now_ns(), clock), payload)


def test_gaps_invalid_messages_and_restarts_on_the_wire(ctx):
    raw = ctx.socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Subscriber(f"tcp://127.0.0.1:{port}", "status", context=ctx, timeout_s=0.5) as sub:
            stream = str(uuid.uuid4())
            deadline = time.monotonic() + 5
            while sub.recv(0.05) is None:   # slow joiner: seq 0 repeated until one arrives
                assert time.monotonic() < deadline
                raw.send_multipart(raw_message(stream, 0))
            raw.send_multipart([b"emollama.v2.status.", b"{}", b"not json"])
            raw.send_multipart(raw_message(stream, 1, payload={"state": "dancing"}))
            raw.send_multipart(raw_message(stream, 4))
            later = first(sub, Status)
            assert (later.seq, later.gap, sub.gaps, sub.invalid) == (4, 3, 3, 2)
            assert "'uptime_s' is a required property" in sub.counts.last_invalid
            assert later.utc(1000 + 1500 * 1000) == datetime(2026, 12, 1, 10, 0, 0, 1500, tzinfo=timezone.utc)
            raw.send_multipart(raw_message(str(uuid.uuid4()), 3))   # a restart that lost seq 0..2
            restarted = first(sub, Status)
            assert (restarted.gap, sub.restarts, sub.gaps) == (3, 1, 6)
    finally:
        raw.close(0)


def test_a_slow_consumer_loses_the_oldest_and_sees_gaps(ctx):
    """inproc has no kernel buffers: with RCVHWM 2 and the publisher's SNDHWM 2, a burst must drop (what
    does not fit is lost), and the next estimate that arrives carries the gap."""
    publisher = Publisher(PublishConfig(endpoint=f"inproc://client-{uuid.uuid4()}", sndhwm=2,
                                        status_interval_s=0.2), context=ctx).start()
    try:
        with Subscriber(publisher.endpoint, ("estimate", "status"), context=ctx, rcvhwm=2, timeout_s=0.3) as sub:
            joined(sub)
            publish_windows(publisher, 40)
            time.sleep(0.5)
            records = [r for r in drain(sub, 0.5) if isinstance(r, Estimate)]
            assert records and len(records) < 40 and all(r.gap == 0 for r in records)
            publish_windows(publisher, 1, first_index=40)
            after = first(sub, Estimate)
            assert after.seq == 40 and after.gap == 40 - records[-1].seq - 1 > 0 and sub.gaps >= after.gap
    finally:
        publisher.close()


def rebind(endpoint: str, ctx, timeout_s: float = 3.0) -> Publisher:
    """A fresh Publisher on the endpoint just closed (libzmq releases the port in its I/O thread: retry)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Publisher(PublishConfig(endpoint=endpoint, status_interval_s=0.1), context=ctx).start()
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_publisher_restart_on_the_same_endpoint_is_a_restart_and_a_reconnect(ctx):
    first_pub = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.1), context=ctx).start()
    endpoint = first_pub.endpoint
    with Subscriber(endpoint, "status", context=ctx, timeout_s=0.5) as sub:
        old = joined(sub).stream_id
        first_pub.close()
        second = rebind(endpoint, ctx)
        try:
            deadline = time.monotonic() + 8
            while sub.restarts == 0 and time.monotonic() < deadline:
                sub.recv(0.2)
            assert sub.restarts == 1 and sub.latest("status").stream_id == second.stream_id != old
            assert sub.reconnects >= 1 and sub.connected
        finally:
            second.close()


def test_control_methods(served):
    pub, server = served
    control = Control(server.endpoint, timeout_s=3.0, publish=pub.endpoint)
    pong = control.ping()
    assert pong["pong"] is True and pong["stream_id"] == pub.stream_id
    status = control.status()
    assert isinstance(status, Status) and status.seq is None and status.state in ("starting", "degraded")
    with pytest.raises(InputError, match="no clock anchor"):
        status.utc(0)
    assert control.latest() is None and control.schema()["schema_version"] == "2.0.0"
    publish_windows(pub, 2)
    deadline = time.monotonic() + 3
    while (latest := control.latest()) is None or latest.window_index < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert isinstance(latest, Estimate) and latest.stream_id == pub.stream_id and latest.seq == 1
    with pytest.raises(InputError, match="unknown kind"):
        control.latest("estimates")


def test_control_errors_carry_the_code(served):
    pub, server = served
    control = Control(server.endpoint, timeout_s=3.0, publish=pub.endpoint)
    with pytest.raises(ControlError) as refused:
        control.ask("dance")
    assert refused.value.code == "unknown_verb" and "dance" in str(refused.value)
    with pytest.raises(ControlError) as unavailable:   # no reasoning worker in this run
        control.explain(timeout_s=3.0)
    assert unavailable.value.code == "unavailable" and isinstance(unavailable.value, InputError)


def test_a_dead_control_endpoint_times_out_quickly():
    started = time.monotonic()
    with pytest.raises(InputError, match="no reply from the control socket"):
        Control(DEAD, timeout_s=0.2).ping()
    assert time.monotonic() - started < 1.5


def test_from_message_validates():
    message = raw_message(str(uuid.uuid4()), 0, payload={"state": "dancing"})
    topic, head, payload = (message[0].decode(), json.loads(message[1]), json.loads(message[2]))
    with pytest.raises(InputError, match="does not follow the wire schema"):
        from_message(topic, head, payload)
    with pytest.raises(InputError, match="unknown topic"):
        from_message("emollama.v2.estimates.", head, payload)
    reason = {"request_id": "r1", "text": "smiling", "final": True, "label": "happy"}
    clock = {"monotonic_ns": 1, "utc": "2026-12-01T10:00:00.000000Z"}
    head = header("reason", str(uuid.uuid4()), 0, None, now_ns(), clock)
    assert message_errors(TOPICS["reason"], head, reason) == []
    record = from_message(TOPICS["reason"], head, reason)
    assert isinstance(record, Reason) and record.text == "smiling" and record.final and record.kind == "reason"


def test_async_subscriber_and_control(served, ctx):
    pub, server = served

    async def scenario():
        control = AsyncControl(server.endpoint, timeout_s=3.0, publish=pub.endpoint)
        assert (await control.ping())["stream_id"] == pub.stream_id
        assert isinstance(await control.status(), Status) and await control.latest() is None
        with pytest.raises(ControlError) as refused:
            await control.ask("dance")
        assert refused.value.code == "unknown_verb"
        with pytest.raises(ControlError, match="unavailable"):
            await control.explain(timeout_s=3.0)
        async with AsyncSubscriber(pub.endpoint, "estimate", timeout_s=0.5) as sub:
            await asyncio.sleep(0.3)   # slow joiner (no status topic here, so iteration can end)
            publish_windows(pub, 2)
            estimates = []
            async for record in sub:   # ends after 0.5 s without an estimate: statuses are not subscribed
                estimates.append(record)
                if len(estimates) == 2:
                    break
            assert [e.window_index for e in estimates] == [0, 1] and sub.latest().window_index == 1
            assert sub.gaps == 0 and sub.invalid == 0

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_async_control_dead_endpoint_times_out():
    async def ping():
        await AsyncControl(DEAD, timeout_s=0.2).ping()

    started = time.monotonic()
    with pytest.raises(InputError, match="no reply"):
        asyncio.run(asyncio.wait_for(ping(), 5))
    assert time.monotonic() - started < 1.5


def test_listen_json_through_the_cli(pub, capsys):
    stop = threading.Event()

    def keep_publishing():
        k = 0
        while not stop.is_set() and k < 100:   # until listen got one (slow joiner), bounded
            publish_windows(pub, 1, first_index=k)
            k += 1
            stop.wait(0.05)

    thread = threading.Thread(target=keep_publishing, daemon=True)
    thread.start()
    try:
        assert main(["listen", pub.endpoint, "--json", "-n", "1", "-t", "5", "--topic", "emollama.v2.estimate."]) == 0
    finally:
        stop.set()
        thread.join(5)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    message = json.loads(lines[0])
    assert set(message) == {"topic", "header", "payload"} and message["topic"].startswith(TOPICS["estimate"])
    assert message_errors(message["topic"], message["header"], message["payload"]) == []

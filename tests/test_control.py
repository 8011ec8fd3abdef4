"""The control socket on real sockets: every verb, malformed requests, and that it keeps serving."""
import json
import time

import numpy as np
import pytest
import zmq

from edge_emollama.errors import ConfigError
from edge_emollama.runtime.clock import now_ns
from edge_emollama.client import request
from edge_emollama.config import ControlConfig, PublishConfig
from edge_emollama.runtime.control import ControlServer
from edge_emollama.runtime.fusion import Fusion
from edge_emollama.protocol import message_errors, schema_errors
from edge_emollama.runtime.publish import Publisher
from edge_emollama.spec import LABELS

S = 1_000_000_000


def valid_reply(reply: dict) -> dict:
    assert schema_errors("control_reply", reply) == []
    return reply


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def served(ctx):
    pub = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.2), context=ctx).start()
    server = ControlServer.for_publisher(pub, ControlConfig(endpoint="tcp://127.0.0.1:*", max_request_bytes=4096))
    server.start()
    yield pub, server
    server.close()
    pub.close()
    assert server.error is None


def ask(server, payload, ctx):
    return valid_reply(request(server.endpoint, payload, timeout_s=3.0, context=ctx))


def test_ping_status_schema(served, ctx):
    pub, server = served
    reply = ask(server, {"verb": "ping", "id": "a1"}, ctx)
    assert reply["ok"] and reply["id"] == "a1" and reply["result"]["pong"] is True
    assert reply["result"]["stream_id"] == pub.stream_id and reply["result"]["clock"] == pub.anchor.to_dict()
    status = ask(server, {"verb": "status", "id": 7}, ctx)["result"]
    assert status["state"] in ("starting", "degraded")
    schema = ask(server, {"verb": "schema"}, ctx)["result"]
    assert schema["schema_version"] == "1.1.0" and "estimate" in schema["schema"]["$defs"]
    assert schema["topics"]["estimate"] == "emollama.v1.estimate"


def test_latest_for_late_joiners(served, ctx):
    pub, server = served
    assert ask(server, {"verb": "latest"}, ctx)["result"] is None
    fusion = Fusion()
    presence = {"video": {"present": True}, "face": {"present": False, "fraction": 0.0},
                "audio": {"present": False, "active": False, "rms": 0.0, "coverage": 0.0}}
    t = now_ns()
    est = fusion.update(np.arange(1, len(LABELS) + 1), t - 2 * S, t, presence)
    pub.publish_estimate(est, presence, {"llm_ms": 3.0}, 0, "ema")
    deadline = time.monotonic() + 3
    while pub.latest() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    latest = ask(server, {"verb": "latest", "topic": "estimate"}, ctx)["result"]
    assert message_errors(latest["topic"], latest["header"], latest["payload"]) == []
    assert latest["payload"]["dominant"]["label"] == LABELS[-1]
    status = ask(server, {"verb": "latest", "topic": "status"}, ctx)["result"]
    assert status["topic"] == "emollama.v1.status"


MALFORMED = [
    (b"not json at all", "bad_json"),
    (b"\xff\xfe\x00garbage", "bad_json"),
    (b"[1, 2, 3]", "bad_request"),
    (b'"ping"', "bad_request"),
    (b'{"id": 1}', "bad_request"),
    (b'{"verb": 42}', "bad_request"),
    (b'{"verb": "ping", "id": {"nested": true}}', "bad_request"),
    (b'{"verb": "dance"}', "unknown_verb"),
    (b'{"verb": "latest", "topic": 5}', "bad_request"),
    (b'{"verb": "latest", "topic": "estimates"}', "bad_request"),
    (b'{"verb": "explain"}', "unavailable"),
    (b"", "bad_json"),
]


def test_malformed_requests_get_error_replies(served, ctx):
    _, server = served
    for body, code in MALFORMED:
        reply = ask(server, body, ctx)
        assert reply["ok"] is False and reply["error"]["code"] == code, (body, reply)
        assert reply["error"]["message"]
    assert ask(server, {"verb": "ping"}, ctx)["ok"]
    assert server.served == len(MALFORMED) + 1 and server.error is None


def test_explain_callback(served, ctx):
    _, server = served
    calls = []

    def explain(args):
        calls.append(args)
        if args.get("subtitle") == "boom":
            raise RuntimeError("the reasoning worker is busy")
        return {"request_id": "r1", "queued": True}

    server.set_explain(explain)
    reply = ask(server, {"verb": "explain", "id": 3, "subtitle": "I am fine"}, ctx)
    assert reply["ok"] and reply["result"] == {"request_id": "r1", "queued": True}
    assert calls == [{"subtitle": "I am fine"}]
    failed = ask(server, {"verb": "explain", "subtitle": "boom"}, ctx)
    assert failed["error"]["code"] == "internal" and "busy" in failed["error"]["message"]
    wrong = ask(server, {"verb": "explain", "subtitle": 12}, ctx)
    assert wrong["error"]["code"] == "bad_request"
    server.set_explain(lambda args: {"not_json": float("nan")})
    assert ask(server, {"verb": "explain"}, ctx)["error"]["code"] == "internal"
    assert ask(server, {"verb": "ping"}, ctx)["ok"]


def test_dealer_clients_multiframe_and_oversize(served, ctx):
    _, server = served
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    dealer.send(json.dumps({"verb": "ping", "id": 1}).encode())  # no empty delimiter
    assert dealer.poll(3000)
    assert valid_reply(json.loads(dealer.recv_multipart()[-1]))["result"]["pong"]
    dealer.send_multipart([b"", b'{"verb": "ping"}', b'{"verb": "status"}'])
    assert dealer.poll(3000)
    frames = dealer.recv_multipart()
    assert frames[0] == b"" and json.loads(frames[-1])["error"]["code"] == "bad_request"
    dealer.send(b"x" * 10_000)  # over max_request_bytes: libzmq drops that peer
    time.sleep(0.2)
    dealer.close(0)
    for _ in range(3):  # other clients are still served
        assert ask(server, {"verb": "ping"}, ctx)["ok"]


def test_client_that_never_reads_does_not_block(served, ctx):
    _, server = served
    ghosts = []
    for _ in range(20):
        ghost = ctx.socket(zmq.REQ)
        ghost.setsockopt(zmq.LINGER, 0)
        ghost.connect(server.endpoint)
        ghost.send(b'{"verb": "schema"}')  # reply never read
        ghosts.append(ghost)
    for ghost in ghosts:
        ghost.close(0)  # vanish with a reply in flight
    start = time.monotonic()
    assert ask(server, {"verb": "ping"}, ctx)["ok"]
    assert time.monotonic() - start < 2.0


def test_bind_conflict(served, ctx):
    _, server = served
    with pytest.raises(ConfigError, match="cannot bind the control socket"):
        ControlServer(ControlConfig(endpoint=server.endpoint), status=dict, latest=lambda t: None,
                      context=ctx).start()


def test_a_dead_control_thread_shows_in_the_status(served, ctx, monkeypatch, caplog):
    """A failure of the control loop itself (injected here) stops answering but not the stream: the status
    says so, with the component named, and the log keeps the traceback."""
    pub, server = served

    def broken(frames):
        raise RuntimeError("injected control failure")

    monkeypatch.setattr(server, "_answer", broken)
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    sock.send(b'{"verb": "ping"}')
    deadline = time.monotonic() + 5
    while server.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close(0)
    status = pub.tracker.snapshot()
    assert status["state"] == "degraded" and any("control stopped" in r and "injected" in r for r in status["reasons"])
    assert status["counters"]["errors"] == 1 and status["last_error"]["stage"] == "control"
    assert "Traceback" in caplog.text and "injected control failure" in caplog.text
    server.error = None   # the fixture checks that no other test left the server dead

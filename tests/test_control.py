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
    assert schema["schema_version"] == "2.0.0" and "estimate" in schema["schema"]["$defs"]
    assert schema["topics"]["estimate"] == "emollama.v2.estimate."


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
    assert status["topic"] == "emollama.v2.status."


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

    def explain(args, client):
        calls.append(args)
        assert isinstance(client, bytes) and client   # the ROUTER's identity of the asking client
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
    server.set_explain(lambda args, client: {"not_json": float("nan")})
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


# -- requests no content can break -------------------------------------------------------------------------
def dealer(ctx, endpoint, identity: bytes | None = None):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    return sock


def exchange(sock, frames: list) -> dict:
    """Send ``[b"", *frames]`` (as a REQ would) and return the reply, checked against the schema."""
    sock.send_multipart([b"", *frames])
    assert sock.poll(3000), f"no reply to {[f[:40] for f in frames]}"
    reply = sock.recv_multipart()
    assert reply[0] == b"" and len(reply) == 2
    return valid_reply(json.loads(reply[1]))


def pick(rng, choices: list):
    return choices[int(rng.integers(len(choices)))]


def _nested(rng) -> tuple:
    """Nesting far beyond MAX_DEPTH; invalid at the bottom it is bad JSON unless too deep to parse at all."""
    depth = int(pick(rng, [40, 200, 999, 1001, 5000, 10000]))
    opener, closer = (b"[", b"]") if rng.random() < 0.5 else (b'{"a":', b"}")
    valid = depth > 200 or rng.random() < 0.8
    body = b'{"verb": "ping", "x": ' + opener * depth + (b"1" if valid else b"x") + closer * depth + b"}"
    return body, "bad_request" if valid else "bad_json"


def _surrogate(rng) -> bytes:
    where = pick(rng, ["id", "verb", "key", "deep", "topic", "subtitle"])
    bad = pick(rng, ['"\\ud800"', '"a\\udfffb"', '"\\udc00\\ud800"'])
    return {"id": f'{{"verb": "ping", "id": {bad}}}', "verb": f'{{"verb": {bad}, "id": 1}}',
            "key": f'{{"verb": "ping", {bad}: 1}}', "deep": f'{{"verb": "ping", "x": [[{{"y": {bad}}}]]}}',
            "topic": f'{{"verb": "latest", "topic": {bad}}}',
            "subtitle": f'{{"verb": "explain", "subtitle": {bad}}}'}[where].encode()


def _number(rng) -> tuple:
    return pick(rng, [
        (b'{"verb": "ping", "id": ' + b"9" * int(rng.integers(21, 5000)) + b"}", "bad_request"),
        (b'{"verb": "ping", "id": 1e400}', "bad_request"),
        (b'{"verb": "ping", "id": -1e999, "x": 2}', "bad_request"),
        (b'{"verb": "ping", "id": NaN}', "bad_json"),
        (b'{"verb": "ping", "x": [Infinity]}', "bad_json"),
        (b'{"verb": "ping", "id": 9223372036854775808}', "bad_request"),
        (b'{"verb": "ping", "id": 1.5}', "bad_request"),
    ])


def malformed(rng) -> tuple:
    """(frames after the delimiter, the error code expected) for one malformed request of a random kind."""
    kind = rng.integers(0, 8)
    if kind == 0:
        body, code = _nested(rng)
        return [body], code
    if kind == 1:
        return [_surrogate(rng)], "bad_request"
    if kind == 2:
        body, code = _number(rng)
        return [body], code
    if kind == 3:
        return [pick(rng, [b"[1, 2]", b'"ping"', b"42", b"null", b"true", b"[]", b"-0"])], "bad_request"
    if kind == 4:
        return [bytes(rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8)) + b"\xff"], "bad_json"
    if kind == 5:   # a few frames, each under the per-frame bound, together over the request bound
        return [b"y" * 30_000] * int(rng.integers(3, 12)), "too_large"
    if kind == 6:   # more frames than a message may have, all tiny
        return [b"{}"] * int(rng.integers(17, 200)), "too_large"
    return [b'{"verb": "ping"}', b'{"verb": "ping"}'], "bad_request"


@pytest.fixture
def served_64k(ctx):
    """A server with the default request bound (64 KiB), room for deep nesting and long strings."""
    pub = Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*"), context=ctx).start()
    server = ControlServer.for_publisher(pub, ControlConfig(endpoint="tcp://127.0.0.1:*", max_request_bytes=65536))
    server.start()
    yield pub, server
    server.close()
    pub.close()
    assert server.error is None


def test_no_request_can_stop_the_server(served_64k, ctx):
    """500+ malformed requests of every kind (seeded): each gets its error reply, then a ping still answers."""
    _, server = served_64k
    rng = np.random.default_rng(1234)
    sock = dealer(ctx, server.endpoint)
    seen = set()
    for i in range(520):
        frames, code = malformed(rng)
        reply = exchange(sock, frames)
        assert reply["ok"] is False and reply["error"]["code"] == code, (i, [f[:60] for f in frames], reply)
        assert "\\ud" not in json.dumps(reply) and "\ud800" not in reply["error"]["message"]
        seen.add(code)
    assert seen == {"bad_request", "bad_json", "too_large"}
    assert exchange(sock, [b'{"verb": "ping", "id": "after"}'])["result"]["pong"]
    deadline = time.monotonic() + 2   # the server counts a reply after sending it: the client may be first
    while server.served < 521 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.served == 521 and server.dropped == 0 and server.restarts == 0 and server.error is None
    assert server.too_large > 0 and server.internal == 0
    sock.close(0)


def test_surrogates_are_refused_without_echo(served, ctx):
    _, server = served
    sock = dealer(ctx, server.endpoint)
    reply = exchange(sock, [b'{"verb": "\\ud800", "id": "\\udfff"}'])
    assert reply["verb"] is None and reply["id"] is None and reply["error"]["code"] == "bad_request"
    assert "surrogate" in reply["error"]["message"]
    reply = exchange(sock, [b'{"verb": "ping", "id": 5, "x": "\\ud800"}'])
    assert reply["error"]["code"] == "bad_request" and reply["id"] is None
    long_verb = exchange(sock, [json.dumps({"verb": "v" * 3000, "id": 2}).encode()])
    assert long_verb["error"]["code"] == "unknown_verb" and len(long_verb["error"]["message"]) < 200
    sock.close(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_large_multipart_requests_do_not_grow_memory(served_64k, ctx):
    """Messages of many frames under the per-frame bound (ZMQ_MAXMSGSIZE) are cut at max_request_bytes and
    the rest discarded unread: 100 of 2.4 MB each leave the server's memory where it was."""
    _, server = served_64k
    sock = dealer(ctx, server.endpoint)
    frames = [b"z" * 60_000] * 40
    for _ in range(10):   # warm up the allocator
        assert exchange(sock, frames)["error"]["code"] == "too_large"
    before = _rss_bytes()
    for _ in range(100):
        assert exchange(sock, frames)["error"]["code"] == "too_large"
    grown = _rss_bytes() - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB over 100 requests of 2.4 MB"
    assert exchange(sock, [b'{"verb": "ping"}'])["ok"]
    assert server.too_large == 110 and server.error is None
    sock.close(0)


def test_a_failing_handler_is_answered_internal_and_logged(ctx, caplog):
    def broken_status():
        raise KeyError("injected status failure")

    with ControlServer(ControlConfig(endpoint="tcp://127.0.0.1:*"), status=broken_status,
                       latest=lambda topic: {"bad": float("nan")}, context=ctx) as server:
        sock = dealer(ctx, server.endpoint)
        reply = exchange(sock, [b'{"verb": "status", "id": 4}'])
        assert reply["error"]["code"] == "internal" and "injected status failure" in reply["error"]["message"]
        assert reply["id"] == 4 and reply["verb"] == "status"
        assert exchange(sock, [b'{"verb": "latest"}'])["error"]["code"] == "internal"   # NaN cannot be sent
        assert exchange(sock, [b'{"verb": "ping"}'])["ok"]
        assert server.internal == 2 and server.error is None and server.restarts == 0
        sock.close(0)
    assert "Traceback" in caplog.text and "injected status failure" in caplog.text


def test_the_loop_restarts_after_a_failure(served, ctx, monkeypatch, caplog):
    pub, server = served
    real, failures = server._answer, []

    def fails_once(incoming):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected loop failure")
        return real(incoming)

    monkeypatch.setattr(server, "_answer", fails_once)
    sock = dealer(ctx, server.endpoint)
    sock.send_multipart([b"", b'{"verb": "ping"}'])   # lost with the failure
    assert not sock.poll(50)
    assert exchange(sock, [b'{"verb": "ping", "id": 2}'])["id"] == 2   # answered after the restart
    assert server.restarts == 1 and isinstance(server.error, RuntimeError)
    assert pub.tracker.snapshot()["last_error"]["stage"] == "control"
    assert "injected loop failure" in caplog.text and "restarted" in caplog.text
    sock.close(0)
    server.error = None


# -- explain: per-client budget and subtitles that cannot fit ----------------------------------------------
def test_client_budget_window():
    from edge_emollama.runtime.reasoning import ClientBudget

    now = [100.0]
    budget = ClientBudget(3, window_s=60.0, max_clients=2, clock=lambda: now[0])
    for _ in range(3):
        assert budget.retry_after_s(b"a") == 0.0
        budget.admit(b"a")
        now[0] += 10.0
    assert budget.retry_after_s(b"a") == pytest.approx(30.0) and budget.retry_after_s(b"b") == 0.0
    now[0] += 30.0
    assert budget.retry_after_s(b"a") == 0.0      # the first admission left the window
    budget.admit(b"b")
    budget.admit(b"c")                             # a third client: the least recent one (a) is forgotten
    assert set(budget._admitted) == {b"b", b"c"}
    assert ClientBudget(0).retry_after_s(b"x") == 0.0   # 0: no limit


@pytest.fixture
def reasoner(tiny_artifacts, served_64k):
    from edge_emollama.manifest import load_artifacts
    from edge_emollama.runtime.reasoning import ReasoningWorker
    from edge_emollama.runtime.stages import LlmStage

    pub, server = served_64k
    artifacts = load_artifacts(tiny_artifacts)
    stage = LlmStage(artifacts)
    worker = ReasoningWorker(stage, pub, max_tokens=8, per_client_per_minute=3)
    rows = np.zeros((artifacts.spec.media_rows, stage.scorer.n_embd), np.float32)
    worker.remember(rows, "", now_ns())
    server.set_explain(worker.request)
    yield pub, server, worker
    server.set_explain(None)
    worker.close()
    stage.scorer.close()


def _wait_reason(pub, request_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        latest = pub.latest("reason")
        if latest is not None and latest["payload"]["request_id"] == request_id:
            return
        time.sleep(0.01)
    raise AssertionError(f"no reason message for {request_id}")


def test_explain_is_rate_limited_per_client(reasoner, ctx):
    pub, server, worker = reasoner
    greedy, other = dealer(ctx, server.endpoint, b"greedy"), dealer(ctx, server.endpoint, b"other")
    explain = [b'{"verb": "explain", "id": 1}']
    for _ in range(3):
        result = exchange(greedy, explain)["result"]
        assert result["status"] == "queued"
        _wait_reason(pub, result["request_id"])
    refused = exchange(greedy, explain)
    assert refused["error"]["code"] == "rate_limited" and 0 < refused["error"]["retry_after_s"] <= 60
    assert "retry in" in refused["error"]["message"] and "per_client_per_minute" in refused["error"]["message"]
    assert exchange(other, explain)["result"]["status"] == "queued"   # another client has its own budget
    assert worker.refused == {"rate_limited": 1, "too_long": 0}
    greedy.close(0)
    other.close(0)


def test_a_subtitle_that_cannot_fit_is_refused_at_once(reasoner, ctx):
    pub, server, worker = reasoner
    sock = dealer(ctx, server.endpoint)
    errors = pub.tracker.snapshot()["counters"]["errors"]
    fits = exchange(sock, [json.dumps({"verb": "explain", "subtitle": "happy " * 10}).encode()])
    assert fits["result"]["status"] == "queued"
    _wait_reason(pub, fits["result"]["request_id"])
    limit = worker.max_subtitle_tokens
    too_long = json.dumps({"verb": "explain", "subtitle": "happy " * (limit + 5)}).encode()
    reply = exchange(sock, [too_long])
    assert reply["error"]["code"] == "too_long" and reply["error"]["limit_tokens"] == limit
    assert f"at most {limit}" in reply["error"]["message"]
    start = time.monotonic()   # the longest subtitle a request can hold is refused quickly too
    longest = exchange(sock, [json.dumps({"verb": "explain", "subtitle": "happy " * 10_900}).encode()])
    assert longest["error"]["code"] == "too_long" and time.monotonic() - start < 1.0
    assert worker.refused["too_long"] == 2
    assert worker._pending == [] and pub.tracker.snapshot()["counters"]["errors"] == errors
    sock.close(0)


def test_latest_of_one_person(served, ctx):
    pub, server = served
    presence = {"video": {"present": True}, "face": {"present": True, "fraction": 1.0},
                "audio": {"present": False, "active": False, "rms": 0.0, "coverage": 0.0}}
    t = now_ns()
    for face_id, winner in ((1, 0), (2, 3), (1, 5)):
        scores = np.ones(len(LABELS))
        scores[winner] = 50.0
        est = Fusion().update(scores, t - 2 * S, t, presence)
        pub.publish_estimate(est, presence, {}, 0, "ema", stream=("hall", face_id), box=[1, 2, 3, 4])
    one, two = "emollama.v2.estimate.hall.face-1.", "emollama.v2.estimate.hall.face-2."
    deadline = time.monotonic() + 3
    while pub.latest(one) is None or pub.latest(one)["payload"]["dominant"]["label"] != LABELS[5]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ask(server, {"verb": "latest", "topic": two}, ctx)["result"]["payload"]["dominant"]["label"] == LABELS[3]
    assert ask(server, {"verb": "latest", "topic": one}, ctx)["result"]["header"]["face_id"] == 1
    assert ask(server, {"verb": "latest"}, ctx)["result"]["topic"] == one          # the newest of anyone
    assert ask(server, {"verb": "latest", "topic": "emollama.v2.estimate.hall.face-9."}, ctx)["result"] is None
    bad = request(server.endpoint, {"verb": "latest", "topic": "emollama.v2.estimate.hall"}, timeout_s=3.0, context=ctx)
    assert not bad["ok"] and bad["error"]["code"] == "bad_request"


def test_explain_names_one_persons_window(reasoner, ctx):
    pub, server, worker = reasoner
    rng = np.random.default_rng()
    rows = rng.standard_normal(worker._latest[0].shape).astype(np.float32)
    worker.remember(rows, "", now_ns(), ("hall", 2))
    sock = dealer(ctx, server.endpoint)
    queued = exchange(sock, [json.dumps({"verb": "explain", "source": "hall", "face_id": 2}).encode()])["result"]
    assert (queued["status"], queued["source"], queued["face_id"]) == ("queued", "hall", 2)
    assert worker._by_stream[("hall", 2)][0] is rows
    _wait_reason(pub, queued["request_id"])
    reason = pub.latest("reason")
    assert (reason["payload"]["source"], reason["payload"]["face_id"]) == ("hall", 2)
    assert message_errors(reason["topic"], reason["header"], reason["payload"]) == []
    missing = exchange(sock, [json.dumps({"verb": "explain", "source": "hall", "face_id": 7}).encode()])
    assert missing["error"]["code"] == "unavailable" and "hall/face-2" in missing["error"]["message"]
    bad = exchange(sock, [json.dumps({"verb": "explain", "source": "hall", "face_id": "2"}).encode()])
    assert bad["error"]["code"] == "bad_request"
    sock.close(0)

"""CURVE with an allow-list, on real sockets: keys, who receives what, the bind policy, point-to-point links."""
import json
import logging
import stat
import threading
import time

import pytest
import zmq

from edge_emollama.cli import main
from edge_emollama.config import HeartbeatConfig, PublishConfig, SecurityConfig
from edge_emollama.client import listen, request
from edge_emollama.errors import ConfigError, OutputError
from edge_emollama.protocol import bind_socket, check_loopback
from edge_emollama.runtime.items import EndOfInput
from edge_emollama.runtime.link import Consumer, LinkOptions, Producer
from edge_emollama.runtime.publish import Publisher, StatusTracker
from edge_emollama.security import (ClientKeys, Security, load_client_keys, load_server_keys, stop_authenticator,
                                    write_keys)

from conftest import free_port

WAIT_S = 3.0          # the longest any test waits for something that should arrive


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    stop_authenticator(context)
    context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path):
    """A key folder with an allow-listed client 'laptop', and a foreign client's keys elsewhere."""
    folder = tmp_path / "keys"
    write_keys(folder, ["laptop"])
    write_keys(tmp_path / "foreign", ["stranger"])
    return folder


def _status_publisher(ctx, security) -> Publisher:
    return Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", status_interval_s=0.05), context=ctx,
                     security=security).start()


def _subscriber(ctx, endpoint: str, client: ClientKeys | None):
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if client is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (client.server_public, client.public,
                                                                          client.secret)
    sock.setsockopt(zmq.SUBSCRIBE, b"emollama.v2.")
    sock.connect(endpoint)
    return sock


def _received(sock, wait_s: float = WAIT_S) -> bool:
    return bool(sock.poll(int(wait_s * 1000)))


def _until(condition, wait_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + wait_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


# --- keys ---------------------------------------------------------------------------------------------------
def test_keys_are_written_with_private_secrets_and_never_overwritten(tmp_path):
    folder = tmp_path / "keys"
    written = write_keys(folder, ["laptop", "ros"])
    names = sorted(p.relative_to(folder).as_posix() for p in written)
    assert names == ["clients/laptop.key", "clients/laptop.key_secret", "clients/ros.key", "clients/ros.key_secret",
                     "server.key", "server.key_secret"]
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert (mode == 0o600) if path.name.endswith("_secret") else not mode & 0o022
    before = (folder / "server.key_secret").read_bytes()
    with pytest.raises(OutputError, match=r"laptop.key_secret already exists.*never overwritten.*remove"):
        write_keys(folder, ["laptop"])
    with pytest.raises(OutputError, match="server.key_secret already exists"):
        write_keys(folder)
    assert write_keys(folder, ["tablet"])[0].name == "tablet.key"      # a client added, the server kept
    assert (folder / "server.key_secret").read_bytes() == before
    with pytest.raises(ConfigError, match="plain file name"):
        write_keys(folder, ["../escape"])


def test_keys_command(tmp_path, capsys):
    folder = tmp_path / "k"
    assert main(["keys", str(folder), "--client", "laptop"]) == 0
    assert "wrote" in capsys.readouterr().out and (folder / "clients" / "laptop.key_secret").is_file()
    assert main(["keys", str(folder), "--client", "laptop"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_keys_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"server.key_secret not found.*edge-emollama keys"):
        load_server_keys(tmp_path)
    write_keys(tmp_path, ["laptop"])
    with pytest.raises(ConfigError, match=r"client 'phone'.*edge-emollama keys .* --client phone"):
        load_client_keys(tmp_path, "phone")


# --- who receives what ----------------------------------------------------------------------------------------
def test_curve_publisher_delivers_only_to_allow_listed_keys(ctx, keys, tmp_path):
    with _status_publisher(ctx, SecurityConfig(curve=str(keys))) as pub:
        allowed = _subscriber(ctx, pub.endpoint, load_client_keys(keys, "laptop"))
        stranger = load_client_keys(tmp_path / "foreign", "stranger")
        unknown = _subscriber(ctx, pub.endpoint, ClientKeys(load_server_keys(keys).public, stranger.public,
                                                            stranger.secret))
        plain = _subscriber(ctx, pub.endpoint, None)
        try:
            assert _received(allowed)
            assert json.loads(allowed.recv_multipart()[1])["topic"] == "emollama.v2.status."
            assert not _received(unknown, 1.0) and not _received(plain, 0.2)
        finally:
            for sock in (allowed, unknown, plain):
                sock.close(0)


def test_listen_with_curve_through_the_command_line(ctx, keys, capsys):
    with _status_publisher(ctx, SecurityConfig(curve=str(keys))) as pub:
        assert main(["listen", pub.endpoint, "--curve", str(keys), "--client", "laptop", "--status", "-t", "1"]) == 0
        assert " status " in capsys.readouterr().out
        assert main(["listen", pub.endpoint, "-t", "0.5"]) == 2            # plaintext: nothing
        assert "--curve DIR --client NAME" in capsys.readouterr().err
        assert main(["listen", pub.endpoint, "--curve", str(keys), "-t", "0.1"]) == 2
        assert "go together" in capsys.readouterr().err


def test_a_curve_control_socket_answers_allow_listed_requests(ctx, keys):
    sock, endpoint = bind_socket(ctx, zmq.REP, "tcp://127.0.0.1:*", {}, HeartbeatConfig(), "a test socket", "-",
                                 security=SecurityConfig(curve=str(keys)))
    thread = threading.Thread(target=lambda: sock.poll(int(WAIT_S * 1000)) and sock.send(sock.recv()), daemon=True)
    thread.start()
    try:
        assert request(endpoint, {"verb": "ping"}, WAIT_S, keys=load_client_keys(keys, "laptop")) == {"verb": "ping"}
    finally:
        thread.join(WAIT_S)
        sock.close(0)


# --- the bind policy --------------------------------------------------------------------------------------------
def test_a_public_bind_needs_curve_or_insecure(ctx, keys, caplog):
    with pytest.raises(ConfigError, match=r"tcp://0.0.0.0:\*.*--curve DIR.*--insecure"):
        Publisher(PublishConfig(endpoint="tcp://0.0.0.0:*"), context=ctx).start()
    with pytest.raises(ConfigError, match="stage link 'rows'"):
        Producer(LinkOptions("tcp://0.0.0.0:*", name="rows"), ctx)
    with caplog.at_level(logging.WARNING):
        Publisher(PublishConfig(endpoint="tcp://0.0.0.0:*"), context=ctx,
                  security=SecurityConfig(insecure=True)).start().close()
    assert "unencrypted" in caplog.text
    Publisher(PublishConfig(endpoint="tcp://0.0.0.0:*"), context=ctx,
              security=SecurityConfig(curve=str(keys))).start().close()
    for endpoint in ("tcp://127.0.0.1:1", "tcp://localhost:1", "tcp://[::1]:1", "ipc:///tmp/x", "inproc://x"):
        check_loopback(endpoint)
    for endpoint in ("tcp://*:1", "tcp://eth0:1", "tcp://10.0.0.2:1"):
        with pytest.raises(ConfigError):
            check_loopback(endpoint, Security())


# --- stage links are point to point ---------------------------------------------------------------------------
def test_a_second_consumer_on_a_link_is_counted_and_warned(ctx, caplog):
    tracker, endpoint = StatusTracker(), f"tcp://127.0.0.1:{free_port()}"
    producer = Producer(LinkOptions(endpoint, name="windows"), ctx, on_peers=tracker.record_link_peers)
    consumer = Consumer(LinkOptions(endpoint, name="windows"), ctx)
    foreign = ctx.socket(zmq.PULL)
    foreign.setsockopt(zmq.LINGER, 0)
    try:
        with caplog.at_level(logging.WARNING):
            assert _until(lambda: producer.monitor.peers == 1)
            foreign.connect(endpoint)
            assert _until(lambda: producer.monitor.extra_peers == 1)
        assert "stage link 'windows'" in caplog.text and "point to point" in caplog.text
        snapshot = tracker.snapshot()
        assert snapshot["counters"]["extra_link_peers"] == 1 and snapshot["state"] == "degraded"
        assert any("stage link 'windows'" in reason for reason in snapshot["reasons"])
        foreign.close(0)
        assert _until(lambda: not tracker.snapshot()["reasons"])
    finally:
        foreign.close(0)
        consumer.close()
        producer.close()


def test_a_curve_link_keeps_foreign_peers_out(ctx, keys):
    endpoint, security = f"tcp://127.0.0.1:{free_port()}", SecurityConfig(curve=str(keys))
    producer = Producer(LinkOptions(endpoint, name="windows"), ctx, security=security)
    consumer = Consumer(LinkOptions(endpoint, name="windows"), ctx, security=security)
    foreign = ctx.socket(zmq.PULL)
    foreign.setsockopt(zmq.LINGER, 0)
    laptop = load_client_keys(keys, "laptop")       # a subscriber's key does not open a stage link
    foreign.curve_serverkey, foreign.curve_publickey, foreign.curve_secretkey = (laptop.server_public,
                                                                                 laptop.public, laptop.secret)
    foreign.connect(endpoint)
    try:
        assert _until(lambda: producer.monitor.refused >= 1)
        assert producer.send(EndOfInput(), block_s=WAIT_S)
        assert isinstance(consumer.get(WAIT_S), EndOfInput)
        assert producer.monitor.extra_peers == 0 and not _received(foreign, 0.2)
    finally:
        foreign.close(0)
        consumer.close()
        producer.close()


def test_stages_split_over_a_curve_link(tiny_artifacts, sample_clip, keys):
    """capture+encode and llm+publish as two processes would run them, with --curve DIR on both."""
    from edge_emollama.config import ReasoningConfig
    from edge_emollama.runtime.pipeline import Pipeline

    from conftest import runtime_config

    links, off, security = {"rows": f"tcp://127.0.0.1:{free_port()}"}, ReasoningConfig(enabled=False), \
        SecurityConfig(curve=str(keys))
    back = Pipeline(runtime_config(tiny_artifacts, stages=["llm", "publish"], links=links, reasoning=off,
                                   security=security), lossless=True).start()
    front = Pipeline(runtime_config(tiny_artifacts, video=sample_clip, realtime=False, stages=["capture", "encode"],
                                    links=links, reasoning=off, security=security)).start()
    try:
        assert front.wait(timeout_s=90) and back.wait(timeout_s=60)
    finally:
        front.close()
        back.close()
    front.raise_errors()
    back.raise_errors()
    assert back.published >= 5

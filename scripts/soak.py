"""The long fault run: the runtime in real time for a while, with every fault a user's network and devices cause.

    python scripts/soak.py --seconds 3600 --out bench-results/soak.json [--artifacts DIR]

One `edge-emollama run` process (a subprocess, as a robot runs it) on a network camera served over HTTP on
loopback by Debian's ffmpeg, looping the sample clip (video only: the camera has no audio); the camera is
stopped and restarted `--losses` times. Meanwhile:
- a healthy subscriber records every estimate (latency, seq gaps, restarts) and the status states;
- a slow subscriber (reads one message a second), a dead one (never reads) and a churning one (connects and
  disconnects every 2 s);
- a fuzzer sends `--requests` control requests (malformed JSON of every kind, deep nesting, lone surrogates,
  many-frame messages, oversized frames, valid verbs, explain floods) spread over the middle half;
- the runtime's RSS is read from /proc every 5 s.
Prints a markdown table (for docs/reliability.md) and writes the JSON. Phases: before (the first quarter),
during (the middle half: fuzz, churn, camera losses), after (the last quarter).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Camera:
    """ffmpeg serving the clip, looped, as MJPEG over HTTP on loopback; stop() and start() are a lost camera."""

    def __init__(self, clip: Path):
        self.clip, self.port, self.proc = clip, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/feed.mjpg"

    def start(self) -> None:
        self.proc = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip),
                                      "-an", "-f", "mpjpeg", "-q:v", "5", "-listen", "1", self.url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Subscriber(threading.Thread):
    """A healthy subscriber: every estimate's latency and arrival time, seq gaps, restarts, status states."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, "emollama.v2.")
        self.sock.connect(endpoint)
        self.estimates, self.states, self.gaps, self.streams, self.video = [], [], 0, set(), []
        self.stop_event, self._last = threading.Event(), {}

    def run(self) -> None:
        while not self.stop_event.is_set():
            if not self.sock.poll(200):
                continue
            topic, head, payload = self.sock.recv_multipart()
            head, payload, now = json.loads(head), json.loads(payload), time.monotonic()
            self.streams.add(head["stream_id"])
            last = self._last.get(topic)
            self.gaps += max(0, head["seq"] - last - 1) if last is not None else 0
            self._last[topic] = head["seq"]
            if topic.endswith(b"estimate"):
                self.estimates.append((now, payload["latency_ms"]))
                self.video.append((now, payload["presence"]["video"]["present"]))
            elif topic.endswith(b"status"):
                self.states.append((now, payload["state"]))


def slow_dead_churn(endpoint: str, stop: threading.Event) -> dict:
    ctx, counts = zmq.Context.instance(), {"slow_read": 0, "churn_cycles": 0}
    dead = ctx.socket(zmq.SUB)
    dead.setsockopt(zmq.RCVHWM, 1)
    dead.setsockopt_string(zmq.SUBSCRIBE, "")
    dead.connect(endpoint)

    def slow():
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 2)
        sock.setsockopt_string(zmq.SUBSCRIBE, "")
        sock.connect(endpoint)
        while not stop.wait(1.0):
            if sock.poll(0):
                sock.recv_multipart()
                counts["slow_read"] += 1
        sock.close(0)

    def churn():
        while not stop.wait(2.0):
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt_string(zmq.SUBSCRIBE, "")
            sock.connect(endpoint)
            time.sleep(0.3)
            sock.close(0)
            counts["churn_cycles"] += 1

    threads = [threading.Thread(target=f, daemon=True) for f in (slow, churn)]
    for thread in threads:
        thread.start()
    return {"threads": threads, "counts": counts, "dead": dead}


def bad_requests(rng: random.Random) -> list:
    """One fuzzed request: a list of frames (malformed or valid)."""
    kinds = [
        lambda: [b"{" * rng.randint(1, 5000)],
        lambda: [("[" * rng.randint(500, 5000) + "]" * rng.randint(0, 5000)).encode()],
        lambda: [json.dumps({"verb": "ping", "id": "\ud800"}, ensure_ascii=True).encode()],
        lambda: [b'{"verb": "\\ud800"}'],
        lambda: [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))],
        lambda: [b'{"verb": "latest", "topic": ' + str(rng.randint(-10**30, 10**30)).encode() + b"}"],
        lambda: [b"x" * rng.randint(60_000, 70_000)],
        lambda: [b'{"verb": "ping"}'] * rng.randint(2, 40),
        lambda: [json.dumps({"verb": rng.choice(["ping", "status", "latest", "schema", "explain"]),
                             "id": rng.randint(0, 99)}).encode()],
        lambda: [json.dumps({"verb": "explain", "subtitle": "word " * rng.randint(1, 5000)}).encode()],
    ]
    return rng.choice(kinds)()


def fuzz(endpoint: str, count: int, seconds: float, stop: threading.Event) -> dict:
    """Requests of every kind; an unanswered one is counted by its size (libzmq drops the connection of a
    peer whose frame exceeds ZMQ_MAXMSGSIZE: a transport-level drop, by design)."""
    rng = random.Random(7)
    result = {"sent": 0, "answered": 0, "unanswered": 0, "unanswered_oversized_frame": 0}
    ctx, gap = zmq.Context.instance(), seconds / max(count, 1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for _ in range(count):
        if stop.is_set():
            break
        frames = bad_requests(rng)
        sock.send_multipart(frames)
        result["sent"] += 1
        if sock.poll(2000):
            sock.recv_multipart()
            result["answered"] += 1
        else:
            result["unanswered"] += 1
            result["unanswered_oversized_frame"] += max(len(f) for f in frames) > 65536
        time.sleep(gap)
    sock.close(0)
    return result


def run_role(args) -> None:
    """A load of the soak in a process of its own (a libzmq client that aborts cannot take the measurement
    with it: one did, on a peer's dropped connection, in the first hour-long try): prints its counts as JSON."""
    stop = threading.Event()
    threading.Timer(args.seconds, stop.set).start()
    if args.role == "fuzz":
        print(json.dumps(fuzz(args.endpoint, args.requests, args.seconds, stop)))
        return
    churn = slow_dead_churn(args.endpoint, stop)
    stop.wait()
    for thread in churn["threads"]:
        thread.join(5)
    print(json.dumps(churn["counts"]))


def start_role(role: str, endpoint: str, seconds: float, requests: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", role, "--endpoint", endpoint, "--seconds",
                             str(seconds), "--requests", str(requests)], stdout=subprocess.PIPE, text=True)


def finish_role(proc: subprocess.Popen | None) -> dict | None:
    if proc is None:
        return None
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"exit_code": "killed after 60 s"}
    try:
        return {**json.loads(out.strip().splitlines()[-1]), "exit_code": proc.returncode}
    except (ValueError, IndexError):
        return {"exit_code": proc.returncode, "note": "the load process died (its own libzmq client)"}


def percentiles(values: list) -> dict | None:
    if not values:
        return None
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1), "n": a.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3600)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--losses", type=int, default=20)
    parser.add_argument("--artifacts", default=str(ROOT / "artifacts" / "tiny"))
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "soak.json"))
    parser.add_argument("--role", choices=("fuzz", "churn"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_role(args)
        return
    if shutil.which("ffmpeg") is None:
        sys.exit("the soak serves a network camera with ffmpeg: apt-get install ffmpeg")
    sys.path.insert(0, str(ROOT))
    from edge_emollama.tools.sample_clip import write_sample_clip

    clip = write_sample_clip(Path(tempfile.mkdtemp(prefix="soak-")) / "loop.mp4", seconds=10.0)
    camera = Camera(clip)
    camera.start()
    time.sleep(1.0)
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    runtime = subprocess.Popen([sys.executable, "-m", "edge_emollama", "run", "--camera", camera.url, "--no-mic",
                                "--artifacts", args.artifacts, "--publish", pub, "--control", ctl, "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=open(Path(args.out).with_suffix(".log"), "w"))
    healthy = Subscriber(pub)
    healthy.start()
    start, rss, stop = time.monotonic(), [], threading.Event()
    quarter = args.seconds / 4
    faults = {"camera_losses": 0}
    churn = fuzzer = None
    while (now := time.monotonic() - start) < args.seconds and runtime.poll() is None:
        rss.append((now, rss_mb(runtime.pid)))
        if churn is None and now >= quarter:
            churn = start_role("churn", pub, 2 * quarter, 0)
            fuzzer = start_role("fuzz", ctl, 2 * quarter, args.requests)
        loss_every = 2 * quarter / max(args.losses, 1)
        if quarter <= now < 3 * quarter and faults["camera_losses"] < args.losses and \
                now >= quarter + faults["camera_losses"] * loss_every:
            camera.stop()
            time.sleep(min(3.0, loss_every / 3))
            camera.start()
            faults["camera_losses"] += 1
        if now >= 3 * quarter and not stop.is_set():
            stop.set()
        time.sleep(5.0)
    stop.set()
    alive = runtime.poll() is None
    runtime.send_signal(signal.SIGTERM)
    code = runtime.wait(30)
    healthy.stop_event.set()
    camera.stop()
    fuzz_result, churn_result = finish_role(fuzzer), finish_role(churn)

    end = time.monotonic() - start

    def phase(lo: float, hi: float) -> dict:
        hi = min(hi, end)
        lat = [l for t, l in healthy.estimates if lo <= t - start < hi]
        mem = [m for t, m in rss if lo <= t < hi and m is not None]
        return {"estimates": len(lat), "rate_hz": round(len(lat) / max(hi - lo, 1e-9), 2), "latency_ms": percentiles(lat),
                "rss_mb": None if not mem else {"min": round(min(mem)), "max": round(max(mem))}}

    report = {"seconds": args.seconds, "alive_at_end": alive, "exit_code": code, "faults": faults,
              "fuzz": fuzz_result, "subscribers": churn_result,
              "seq_gaps_seen_by_healthy": healthy.gaps, "streams": len(healthy.streams),
              "states_seen": sorted({s for _, s in healthy.states}),
              "estimates_without_video": sum(1 for _, v in healthy.video if not v),
              "longest_gap_between_estimates_s": round(max(np.diff([t for t, _ in healthy.estimates]), default=0.0), 2),
              "before": phase(0, quarter), "during": phase(quarter, 3 * quarter), "after": phase(3 * quarter, 1e12)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

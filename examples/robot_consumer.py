"""A robot that reacts when the dominant emotion changes: one action per label.

Run against a running runtime (``edge-emollama demo`` in another terminal)::

    .venv/bin/python examples/robot_consumer.py [PUBLISH_ENDPOINT] [--seconds N]

Uses ``edge_emollama.client.Subscriber``: estimates arrive typed and validated; the robot acts only when the
dominant label (after the runtime's hysteresis) changes, and says when messages were lost or the runtime
restarted. The demo's tiny model is untrained: its labels mean nothing.
"""
from __future__ import annotations

import argparse
import time

from edge_emollama.client import Estimate, Subscriber

ACTIONS = {
    "happy": "smile back and keep going",
    "sad": "slow down and ask if everything is all right",
    "neutral": "carry on with the task",
    "angry": "stop moving and give the person space",
    "worried": "explain what the robot is about to do",
    "surprise": "pause for a moment",
    "fear": "back away slowly and lower the speed",
    "contempt": "ask for feedback",
    "doubt": "repeat the last instruction more clearly",
}


def react(estimate: Estimate, previous: str | None) -> str | None:
    """The new label's action when the dominant label changed (None when it did not)."""
    if estimate.dominant_label == previous:
        return None
    face = "face seen" if estimate.presence.face else "no face"
    return (f"{estimate.utc(estimate.t1_ns):%H:%M:%S} {previous or '-'} -> {estimate.dominant_label} "
            f"({estimate.dominant_probability:.2f}, {face}): {ACTIONS[estimate.dominant_label]}")


def run(endpoint: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    previous: str | None = None
    with Subscriber(endpoint, ("estimate",), timeout_s=5.0) as sub:
        for estimate in sub:   # ends after 5 s without an estimate (runtime stopped or unreachable)
            if estimate.gap:
                print(f"note: {estimate.gap} estimate(s) lost before window {estimate.window_index}")
            action = react(estimate, previous)
            if action:
                print(action, flush=True)
            previous = estimate.dominant_label
            if time.monotonic() > deadline:
                break
        print(f"done: {sub.counts.received} estimates, {sub.gaps} lost, {sub.restarts} restart(s), "
              f"{sub.invalid} invalid, {sub.reconnects} reconnection(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555", help="the runtime's PUB endpoint")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long (default 60)")
    args = parser.parse_args()
    run(args.endpoint, args.seconds)


if __name__ == "__main__":
    main()

"""ROS 2 bridge: publishes each estimate as a std_msgs/String (the JSON payload plus its header) on /emotion.

UNTESTED: rclpy cannot be installed where this project is built and tested, so this file has only been
checked for syntax. It needs a sourced ROS 2 installation (rclpy, std_msgs) and edge-emollama's client::

    source /opt/ros/humble/setup.bash
    python3 examples/ros2_bridge.py --ros-args -p endpoint:=tcp://127.0.0.1:5555

Each message is ``{"topic", "seq", "stream_id", "utc", "gap", "payload"}`` as JSON, ``utc`` being the end of
the capture window in UTC (the runtime's clock anchor; docs/protocol.md). The ZeroMQ subscriber is polled by
a ROS timer (20 Hz), so one thread serves both; at most the socket's RCVHWM estimates wait in between.
"""
from __future__ import annotations

import json

import rclpy
from rclpy.node import Node
from std_msgs.msg import String

from edge_emollama.client import Estimate, Subscriber


def estimate_json(estimate: Estimate, payload: dict) -> str:
    return json.dumps({"topic": estimate.topic, "seq": estimate.seq, "stream_id": estimate.stream_id,
                       "utc": estimate.utc(estimate.t1_ns).isoformat(), "gap": estimate.gap, "payload": payload})


def payload_of(estimate: Estimate) -> dict:
    """The estimate's fields as the wire payload's shape (what subscribers of /emotion expect)."""
    p = estimate.presence
    return {"window_index": estimate.window_index, "labels": list(estimate.labels),
            "probabilities": list(estimate.probabilities), "smoothed": list(estimate.smoothed),
            "dominant": {"label": estimate.dominant_label, "probability": estimate.dominant_probability,
                         "since_ns": estimate.dominant_since_ns},
            "smoothing": estimate.smoothing,
            "presence": {"video": {"present": p.video}, "face": {"present": p.face, "fraction": p.face_fraction},
                         "audio": {"present": p.audio, "active": p.audio_active, "rms": p.audio_rms,
                                   "coverage": p.audio_coverage}},
            "timings_ms": dict(estimate.timings_ms), "latency_ms": estimate.latency_ms,
            "subtitle": estimate.subtitle}


class EmotionBridge(Node):
    def __init__(self):
        super().__init__("emotion_bridge")
        endpoint = self.declare_parameter("endpoint", "tcp://127.0.0.1:5555").value
        self.publisher = self.create_publisher(String, "emotion", 10)
        self.subscriber = Subscriber(endpoint, ("estimate",))
        self.timer = self.create_timer(0.05, self.forward)
        self.get_logger().info(f"bridging estimates from {endpoint} to /emotion")

    def forward(self) -> None:
        """Every estimate queued since the last tick (never blocks the executor)."""
        while (estimate := self.subscriber.recv(timeout_s=0)) is not None:
            if estimate.gap:
                self.get_logger().warning(f"{estimate.gap} estimate(s) lost before seq {estimate.seq}")
            self.publisher.publish(String(data=estimate_json(estimate, payload_of(estimate))))

    def destroy_node(self):
        self.subscriber.close()
        return super().destroy_node()


def main() -> None:
    rclpy.init()
    node = EmotionBridge()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.shutdown()


if __name__ == "__main__":
    main()

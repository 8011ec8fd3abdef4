// Node.js subscriber for edge-emollama's estimates and events (wire protocol v1, docs/protocol.md).
//
//   npm install zeromq@6
//   node examples/node_subscriber.js [tcp://127.0.0.1:5555]
//
// Each message is three frames [topic, header, payload] of UTF-8 JSON. This checks seq per topic (a jump
// means messages were lost) and stream_id (a new value means the runtime restarted), and prints the dominant
// label of each estimate with its capture time in UTC (through the header's clock anchor).
// Monotonic nanoseconds exceed 2^53 only after about 104 days of host uptime; use a BigInt-aware JSON
// parser if that matters. Verified here with zeromq 6.8.0 on Node v20.20.2 against the runtime's own Publisher
// (estimates printed, seq checked); the event lines and a restart were not exercised.
"use strict";

const zmq = require("zeromq");

const endpoint = process.argv[2] || "tcp://127.0.0.1:5555";

function utcOf(header, tNs) {
  // utc(t) = clock.utc + (t - clock.monotonic_ns) ns
  const anchorMs = Date.parse(header.clock.utc);
  return new Date(anchorMs + (tNs - header.clock.monotonic_ns) / 1e6).toISOString();
}

function describe(topic, header, payload) {
  if (topic === "emollama.v1.estimate") {
    const d = payload.dominant;
    const face = payload.presence.face.present ? "face" : "no face";
    return `${utcOf(header, header.window.t1_ns)} #${header.seq} ${d.label} ${d.probability.toFixed(2)} ` +
      `(${face}, latency ${payload.latency_ms.toFixed(0)} ms)`;
  }
  if (payload.kind === "dominant_changed") return `event: ${payload.previous || "-"} -> ${payload.current}`;
  if (payload.kind === "presence_changed") return `event: ${payload.modality} ${payload.present ? "appeared" : "gone"}`;
  return `event: ${payload.kind} ${payload.stage || ""} ${payload.message || ""}`;
}

async function main() {
  const sub = new zmq.Subscriber({
    receiveHighWaterMark: 64,          // bounded: what does not fit is lost (and shows as a seq gap)
    heartbeatInterval: 1000, heartbeatTimeout: 3000, heartbeatTimeToLive: 3000,
    linger: 0,
  });
  sub.connect(endpoint);
  sub.subscribe("emollama.v1.estimate", "emollama.v1.event");
  console.error(`listening to ${endpoint} (Ctrl-C to stop)`);

  let stream = null;
  const lastSeq = new Map();
  for await (const [topicFrame, headerFrame, payloadFrame] of sub) {
    const topic = topicFrame.toString("utf8");
    let header, payload;
    try {
      header = JSON.parse(headerFrame.toString("utf8"));
      payload = JSON.parse(payloadFrame.toString("utf8"));
    } catch (err) {
      console.error(`invalid message on ${topic}: ${err.message}`);
      continue;
    }
    if (stream !== null && header.stream_id !== stream) {
      console.error(`note: the runtime restarted (stream ${header.stream_id})`);
      lastSeq.clear();
    }
    stream = header.stream_id;
    const last = lastSeq.get(topic);
    if (last !== undefined && header.seq !== last + 1) {
      console.error(`note: ${topic} lost ${header.seq - last - 1} message(s)`);
    }
    lastSeq.set(topic, header.seq);
    console.log(describe(topic, header, payload));
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

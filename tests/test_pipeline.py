"""The streaming runtime end to end on the tiny preset, with real sockets and a real sample clip."""
import threading
import time

import numpy as np

from edge_emollama.client import listen, request
from edge_emollama.config import FileConfig, PublishConfig, ReasoningConfig
from edge_emollama.protocol import message_errors
from edge_emollama.runtime.items import Presence, RowsItem, WindowStamp
from edge_emollama.runtime.link import Consumer, LinkOptions, Producer
from edge_emollama.runtime.pipeline import Pipeline
from edge_emollama.spec import LABELS

from conftest import Recorder, runtime_config


def _options(artifacts, clip, endpoints, realtime=True, **kw):
    return runtime_config(artifacts, endpoints, video=clip, realtime=realtime, **kw)


def test_clip_run_publishes_valid_ordered_estimates(tiny_artifacts, sample_clip, endpoints):
    recorder = Recorder(endpoints[0])
    pipeline = Pipeline(_options(tiny_artifacts, sample_clip, endpoints, realtime=False)).start()
    assert pipeline.wait(timeout_s=90)
    pipeline.close()
    recorder.stop()
    pipeline.raise_errors()
    estimates = recorder.of("estimate")
    assert len(estimates) == pipeline.published >= 5    # 4 s clip, W 2 s, H 0.5 s: 5 windows, none dropped
    for topic, header, payload in recorder.messages:
        assert message_errors(topic, header, payload) == []
    seqs = [h["seq"] for _, h, _ in estimates]
    t1s = [h["window"]["t1_ns"] for _, h, _ in estimates]
    assert seqs == list(range(len(seqs))) and all(b > a for a, b in zip(t1s, t1s[1:]))
    assert len({h["stream_id"] for _, h, _ in recorder.messages}) == 1
    for _, _, p in estimates:
        assert abs(sum(p["probabilities"]) - 1) < 1e-6 and abs(sum(p["smoothed"]) - 1) < 1e-6
        assert p["presence"]["face"]["present"] and p["presence"]["audio"]["present"]
        assert {"encoders_ms", "llm_ms", "window_ms"} <= set(p["timings_ms"])
    assert recorder.of("status")[-1][2]["state"] == "stopped"


def test_runtime_distribution_equals_the_reference(tiny_artifacts, tiny_tok):
    """The encoder and LLM stages against the reference on fresh windows, the preprocessing written out here
    from preprocess.py's functions (not through the branch declarations the stages use)."""
    from edge_emollama import preprocess
    from edge_emollama.config import LlmConfig
    from edge_emollama.manifest import load_artifacts
    from edge_emollama.reference.synthetic import build_random
    from edge_emollama.runtime.items import synthetic_window
    from edge_emollama.runtime.stages import EncoderStage, LlmStage
    from edge_emollama.spec import TINY

    artifacts = load_artifacts(tiny_artifacts)
    encoders, llm = EncoderStage(artifacts, parallel=False), LlmStage(artifacts, LlmConfig(threads=1, quant="F16"))
    reference = build_random(TINY, tiny_tok, seed=0)
    rng = np.random.default_rng()
    for frames in (3, 11):
        crops = rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8)
        item = synthetic_window(TINY, rng, crops=crops)
        item.frame = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
        got = llm(encoders(item)[0], "i feel good")[0]
        inputs = {"eva": {"pixels": preprocess.eva_pixels(item.frame, TINY)},
                  "mae": {"faces": preprocess.face_batch(list(crops), TINY)},
                  "videomae": {"clip": preprocess.video_clip(list(item.videomae_frames), TINY)},
                  "hubert": {"pcm": preprocess.audio_pcm(item.audio, TINY)}}
        want = reference.label_distribution(reference.media_block(inputs), "i feel good")
        assert np.argmax(got) == np.argmax(want)
        assert float(np.sum(want * (np.log(want) - np.log(got)))) < 1e-3   # the export's F16 tolerance
    llm.close()


def test_video_only_run_states_absent_audio(tiny_artifacts, sample_clip, endpoints):
    seen = []
    options = _options(tiny_artifacts, sample_clip, endpoints, realtime=False, file=FileConfig(audio=False))
    pipeline = Pipeline(options, on_estimate=lambda fused, item: seen.append(item.presence.to_wire())).start()
    assert pipeline.wait(timeout_s=90)
    pipeline.close()
    pipeline.raise_errors()
    assert seen and all(p["audio"]["present"] is False and p["face"]["present"] for p in seen)


def test_control_survives_malformed_requests_and_explain_returns_text(tiny_artifacts, sample_clip, endpoints):
    recorder = Recorder(endpoints[0])
    pipeline = Pipeline(_options(tiny_artifacts, sample_clip, endpoints,
                                 reasoning=ReasoningConfig(max_tokens=12))).start()
    try:
        deadline = time.monotonic() + 20
        while not recorder.of("estimate") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert recorder.of("estimate"), "no estimate within 20 s"
        for bad in (b"not json", b'{"verb": "fly"}', b'{"verb": "latest", "topic": 3}', b"[1, 2]"):
            reply = request(endpoints[1], bad)
            assert reply["ok"] is False and reply["error"]["message"]
        assert request(endpoints[1], {"verb": "ping"})["ok"]
        before = len(recorder.of("estimate"))
        reply = request(endpoints[1], {"verb": "explain"})
        assert reply["ok"] and reply["result"]["status"] == "queued"
        deadline = time.monotonic() + 20
        while not recorder.of("reason") and time.monotonic() < deadline:
            time.sleep(0.1)
        reasons = recorder.of("reason")
        assert reasons and reasons[0][2]["request_id"] == reply["result"]["request_id"]
        assert isinstance(reasons[0][2]["text"], str) and reasons[0][2]["tokens"] >= 0
        assert reasons[0][2]["text"].startswith("[untrained model")   # the tiny export says its words mean nothing
        time.sleep(1.2)
        assert len(recorder.of("estimate")) > before, "estimates stopped while explaining"
        latest = request(endpoints[1], {"verb": "latest"})
        assert latest["ok"] and latest["result"]["payload"]["labels"][0] == "happy"
    finally:
        pipeline.stop()
        recorder.stop()
    pipeline.raise_errors()


def test_an_absent_or_idle_subscriber_never_blocks(tiny_artifacts, sample_clip, endpoints):
    import zmq

    idle = zmq.Context.instance().socket(zmq.SUB)
    idle.setsockopt(zmq.RCVHWM, 1)
    idle.setsockopt_string(zmq.SUBSCRIBE, "")
    idle.connect(endpoints[0])                       # connected, never reads
    options = _options(tiny_artifacts, sample_clip, endpoints, realtime=False,
                       publish=PublishConfig(endpoint=endpoints[0], sndhwm=1))
    start = time.monotonic()
    pipeline = Pipeline(options).start()
    assert pipeline.wait(timeout_s=90)
    pipeline.close()
    idle.close(0)
    pipeline.raise_errors()
    assert pipeline.published >= 5 and time.monotonic() - start < 90


def test_links_keep_the_newest_item_or_lose_nothing():
    for keep_newest in (True, False):
        endpoint = f"inproc://test-link-{keep_newest}"
        producer = Producer(LinkOptions(endpoint, sndhwm=100))
        consumer = Consumer(LinkOptions(endpoint, rcvhwm=100), keep_newest=keep_newest)
        sent, presence = 0, Presence(True, True, 1.0, False, False, 0.0, 0.0)
        for i in range(20):
            item = RowsItem(WindowStamp(i, i, i + 1, presence, {"window_ms": 0.5}), np.full((2, 3), i, np.float32))
            sent += producer.send(item, block_s=1.0)
        time.sleep(0.5)
        got = []
        while (item := consumer.get(0.3)) is not None:
            assert isinstance(item, RowsItem) and item.presence == presence and item.stamp.timings_ms["window_ms"] == 0.5
            got.append(item.index)
            assert np.all(item.rows == item.index) and item.rows.dtype == np.float32
        if keep_newest:
            assert got[-1] == 19 and consumer.replaced + len(got) == 20
        else:
            assert got == list(range(20))
        producer.close()
        consumer.close()


def test_listen_validates_what_it_prints(tiny_artifacts, sample_clip, endpoints, capsys):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=listen(endpoints[0], count=3, timeout=60)))
    thread.start()
    time.sleep(0.4)
    pipeline = Pipeline(_options(tiny_artifacts, sample_clip, endpoints, realtime=False)).start()
    thread.join(90)
    pipeline.stop()
    pipeline.raise_errors()
    assert result["r"].estimates == 3 and result["r"].invalid == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "latency=" in line]
    assert len(lines) == 3 and all(any(label in line for label in LABELS) for line in lines)


def test_the_spoken_words_reach_the_prompt_and_the_estimate(tiny_artifacts, tmp_path, endpoints):
    """The sample clip's espeak-ng voice, transcribed by the bundled Whisper model off the estimate's path:
    later estimates carry the words they used (payload `subtitle`), none waits for a transcript."""
    import shutil

    import pytest

    from edge_emollama.config import AsrConfig
    from edge_emollama.tools.sample_clip import write_sample_clip

    pytest.importorskip("faster_whisper", reason='speech recognition needs pip install -e ".[asr]"')
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    clip = write_sample_clip(tmp_path / "speech.mp4", seconds=6.0, voice="espeak")
    recorder = Recorder(endpoints[0])
    options = _options(tiny_artifacts, clip, endpoints, asr=AsrConfig(model="bundled", context_s=4.0),
                       reasoning=ReasoningConfig(enabled=False))
    pipeline = Pipeline(options).start()
    assert pipeline.wait(timeout_s=60)
    pipeline.close()
    recorder.stop()
    pipeline.raise_errors()
    estimates = [p for _, _, p in recorder.of("estimate")]
    assert len(estimates) >= 8 and all(message_errors(h["topic"], h, p) == []
                                       for _, h, p in recorder.of("estimate"))
    heard = " ".join(p["subtitle"].lower() for p in estimates)
    assert estimates[0]["subtitle"] == ""                      # nothing transcribed before the first window
    assert sum(word in heard for word in ("hello", "test", "happy", "today")) >= 2
    assert max(p["timings_ms"]["llm_ms"] for p in estimates) < 5000 and pipeline.asr.stats().done >= 1

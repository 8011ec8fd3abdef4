"""``edge-emollama report SESSION.jsonl --out report.png|report.html``: a picture of a recorded session.

Per stream (a ``stream_id`` of the recording; a restart is a new one): the smoothed probability of each label
over time with the dominant label as a band under it, events as vertical marks (label changes dashed, face or
voice appearing/disappearing dotted, errors red), the face and audio presence as a strip, and the latency.
``.html`` embeds the PNG (base64) above a table of counts. matplotlib is used without pyplot (Agg).
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, median

from ..errors import InputError
from ..lazy import require
from ..protocol import kind_of
from ..runtime.outputs import anchor_of, message_time_ns, read_recording

__all__ = ["StreamLog", "load_streams", "render_png", "counts_rows", "write_report"]

log = logging.getLogger(__name__)
MAX_STREAMS = 6                  # streams drawn from one recording (the first ones; the table lists all)
EVENT_STYLES = {"dominant_changed": ("black", "--"), "presence_changed": ("tab:purple", ":"),
                "error": ("tab:red", "-")}
PRESENCE_ROWS = ("face", "audio")
STREAM_HEIGHT_IN = 6.5           # figure height per stream drawn


@dataclass
class StreamLog:
    """The messages of one estimate stream of a recording (a run's person or scene of one source; status and
    reasons in a stream of the run's own, ``source`` None), by kind, in recording order."""
    stream_id: str
    source: str | None = None
    face_id: int | None = None
    estimates: list = field(default_factory=list)     # (header, payload)
    events: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    statuses: list = field(default_factory=list)

    @property
    def clock(self) -> dict:
        return (self.estimates or self.events or self.statuses or self.reasons)[0][0]["clock"]

    @property
    def origin_ns(self) -> int:
        """Time zero of the seconds axis: the start of the first window (else the first message)."""
        if self.estimates:
            return int(self.estimates[0][0]["window"]["t0_ns"])
        return min(message_time_ns(h, p) for h, p in self.events + self.statuses + self.reasons)


    @property
    def name(self) -> str:
        """run id (8 hex), and the source and person: ``1a2b3c4d clip/face-2``."""
        if self.source is None:
            return self.stream_id[:8]
        return f"{self.stream_id[:8]} {self.source}/{'scene' if self.face_id is None else f'face-{self.face_id}'}"


def load_streams(messages: list[dict]) -> dict[tuple, StreamLog]:
    """The recording's messages grouped by run (stream id), source and person (in order of first appearance)
    and kind."""
    streams: dict[tuple, StreamLog] = {}
    for message in messages:
        head, payload = message["header"], message["payload"]
        key = (head["stream_id"], head.get("source"), head.get("face_id"))
        stream = streams.setdefault(key, StreamLog(*key))
        kind = kind_of(message["topic"])
        bucket = {"estimate": stream.estimates, "event": stream.events, "reason": stream.reasons,
                  "status": stream.statuses}.get(kind)
        if bucket is not None:
            bucket.append((head, payload))
    return streams


class _TimeAxis:
    """Monotonic ns -> x: seconds from the stream's origin, or matplotlib date numbers (UTC)."""

    def __init__(self, stream: StreamLog, utc: bool):
        self.utc, self.origin = utc, stream.origin_ns
        self.anchor = anchor_of(stream.clock)
        self._dates = require("matplotlib.dates") if utc else None

    def x(self, t_ns: int) -> float:
        if not self.utc:
            return (int(t_ns) - self.origin) / 1e9
        utc_s = self.anchor.to_utc_ns(t_ns) / 1e9
        return float(self._dates.date2num(datetime.fromtimestamp(utc_s, tz=timezone.utc)))

    def style(self, axes) -> None:
        if self.utc:
            axes.xaxis_date(tz=timezone.utc)
            axes.xaxis.set_major_formatter(self._dates.DateFormatter("%H:%M:%S", tz=timezone.utc))


def _spans(stream: StreamLog, axis: _TimeAxis) -> list[tuple[float, float]]:
    """(x, width) of each estimate: from its window's end to the next one's (the last: the median hop)."""
    ends = [axis.x(h["window"]["t1_ns"]) for h, _ in stream.estimates]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    last = median(steps) if steps else (axis.x(stream.estimates[0][0]["window"]["t1_ns"]) - axis.x(
        stream.estimates[0][0]["window"]["t0_ns"]))
    return [(start, step) for start, step in zip(ends, steps + [last])]


def _runs(values: list, spans: list[tuple[float, float]]) -> dict:
    """{value: [(x, width), ...]} merging consecutive estimates with the same value."""
    runs: dict = {}
    for index, (value, (x, width)) in enumerate(zip(values, spans)):
        bars = runs.setdefault(value, [])
        if index > 0 and values[index - 1] == value:
            bars[-1] = (bars[-1][0], x + width - bars[-1][0])
        else:
            bars.append((x, width))
    return runs


def _draw_stream(figure, grid, stream: StreamLog, utc: bool) -> None:
    axis = _TimeAxis(stream, utc)
    probs, band, presence, latency = (figure.add_subplot(cell) for cell in grid)
    for a in (band, presence, latency):
        a.sharex(probs)
    labels = stream.estimates[0][1]["labels"]
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    xs = [axis.x(h["window"]["t1_ns"]) for h, _ in stream.estimates]
    for i, label in enumerate(labels):
        probs.plot(xs, [p["smoothed"][i] for _, p in stream.estimates], color=colours[label], lw=1.4, label=label)
    probs.set_ylim(0, 1)
    probs.set_ylabel("smoothed p")
    start = axis.anchor.to_utc_iso(stream.origin_ns)
    probs.set_title(f"stream {stream.name}   {len(stream.estimates)} estimates   start {start}", fontsize=10,
                    loc="left")
    spans = _spans(stream, axis)
    _draw_band(band, stream, spans, colours)
    _draw_presence(presence, stream, spans)
    latency.plot(xs, [p["latency_ms"] for _, p in stream.estimates], color="tab:gray", lw=1.0, marker=".", ms=3)
    latency.set_ylabel("latency ms")
    latency.set_xlabel("UTC" if utc else "seconds from the first window's start")
    _draw_events(stream, axis, (probs, band, presence, latency))
    for a in (probs, band, presence, latency):
        axis.style(a)
        if a is not latency:
            a.tick_params(labelbottom=False)


def _draw_band(axes, stream: StreamLog, spans, colours: dict) -> None:
    dominant = [p["dominant"]["label"] for _, p in stream.estimates]
    for label, bars in _runs(dominant, spans).items():
        axes.broken_barh(bars, (0, 1), facecolors=colours.get(label, "k"))
    axes.set_yticks([0.5], ["dominant"])
    axes.set_ylim(0, 1)


def _draw_presence(axes, stream: StreamLog, spans) -> None:
    for row, modality in enumerate(PRESENCE_ROWS):
        present = [bool(p["presence"][modality]["present"]) for _, p in stream.estimates]
        for value, bars in _runs(present, spans).items():
            axes.broken_barh(bars, (row + 0.1, 0.8), facecolors="tab:green" if value else "0.85")
    axes.set_yticks([0.5, 1.5], ["face", "audio"])
    axes.set_ylim(0, len(PRESENCE_ROWS))


def _draw_events(stream: StreamLog, axis: _TimeAxis, all_axes) -> None:
    seen = set()
    for head, payload in stream.events:
        colour, style = EVENT_STYLES.get(payload.get("kind"), ("tab:orange", "-."))
        x = axis.x(message_time_ns(head, payload))
        for a in all_axes:
            label = payload.get("kind") if a is all_axes[0] and payload.get("kind") not in seen else None
            a.axvline(x, color=colour, ls=style, lw=0.8, alpha=0.7, label=label)
        seen.add(payload.get("kind"))
    all_axes[0].legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)   # labels, events


def render_png(streams: dict[tuple, StreamLog], utc: bool = False) -> bytes:
    """The picture of the streams that have estimates (at most MAX_STREAMS), as PNG bytes."""
    figure_module = require("matplotlib.figure")
    agg = require("matplotlib.backends.backend_agg")
    drawn = [s for s in streams.values() if s.estimates][:MAX_STREAMS]
    height = STREAM_HEIGHT_IN * len(drawn)
    figure = figure_module.Figure(figsize=(13, height), dpi=100)
    agg.FigureCanvasAgg(figure)
    outer = figure.add_gridspec(len(drawn), 1, hspace=0.25)
    for index, stream in enumerate(drawn):
        grid = outer[index].subgridspec(4, 1, height_ratios=(5, 0.45, 0.9, 1.8), hspace=0.15)
        _draw_stream(figure, [grid[i] for i in range(4)], stream, utc)
    figure.subplots_adjust(left=0.07, right=0.86, top=1 - 0.35 / height, bottom=0.55 / height)   # inches
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def counts_rows(streams: dict[tuple, StreamLog]) -> list[dict]:
    """One row of counts per stream: messages by kind, lost estimates (seq gaps), duration, latency, top label."""
    rows = []
    for stream in streams.values():
        seqs = [h["seq"] for h, _ in stream.estimates]
        latencies = [p["latency_ms"] for _, p in stream.estimates]
        dominant = Counter(p["dominant"]["label"] for _, p in stream.estimates).most_common(1)
        ends = [h["window"]["t1_ns"] for h, _ in stream.estimates]
        rows.append({
            "stream": stream.name, "start (UTC)": anchor_of(stream.clock).to_utc_iso(stream.origin_ns),
            "duration s": round((max(ends) - stream.origin_ns) / 1e9, 2) if ends else 0.0,
            "estimates": len(stream.estimates), "lost estimates": (seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0,
            "events": len(stream.events), "reasons": len(stream.reasons), "status": len(stream.statuses),
            "latency mean ms": round(mean(latencies), 1) if latencies else None,
            "latency max ms": round(max(latencies), 1) if latencies else None,
            "most dominant": f"{dominant[0][0]} ({dominant[0][1]})" if dominant else None,
        })
    return rows


def _html(png: bytes, rows: list[dict], session: Path) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in rows)
    image = base64.b64encode(png).decode()
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edge-emollama report: "
            f"{html.escape(session.name)}</title><style>body{{font-family:sans-serif}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #bbb;padding:2px 6px;font-size:13px}}</style></head><body>"
            f"<h1>{html.escape(session.name)}</h1><table><tr>{head}</tr>{body}</table>"
            f"<p><img alt='the session over time' src='data:image/png;base64,{image}'></p></body></html>\n")


def write_report(session: str | os.PathLike, out: str | os.PathLike | None = None, utc: bool = False) -> Path:
    """Read the recording ``session`` and write ``out`` (.png or .html; default SESSION.png beside it)."""
    session = Path(session)
    out = Path(out) if out is not None else session.with_suffix(".png")
    if out.suffix.lower() not in (".png", ".html"):
        raise InputError(f"--out {out}: the report is a .png or an .html file")
    streams = load_streams(read_recording(session))
    if not any(s.estimates for s in streams.values()):
        raise InputError(f"{session} holds no estimate: nothing to plot (was the run stopped before its first window?)")
    if sum(1 for s in streams.values() if s.estimates) > MAX_STREAMS:
        log.warning("%s has more than %d streams with estimates: the picture shows the first %d, the table all",
                    session, MAX_STREAMS, MAX_STREAMS)
    png = render_png(streams, utc)
    data = png if out.suffix.lower() == ".png" else _html(png, counts_rows(streams), session).encode()
    tmp = out.with_name(out.name + ".tmp")   # written whole, then renamed: no half-written report
    try:
        tmp.write_bytes(data)
    except OSError as exc:
        raise InputError(f"cannot write the report {out}: {exc.strerror or exc} (choose a writable --out)") from exc
    tmp.replace(out)
    return out

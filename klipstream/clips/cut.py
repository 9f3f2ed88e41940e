"""Frame-accurate MP4 clips with PyAV: copy whole GOPs, re-encode only the partial ones at the edges.

A clip [start, end) of an H.264 source is three runs: the frames before the first keyframe inside
the span (decoded from the keyframe before `start` and re-encoded), the complete GOPs inside the
span (packets copied untouched), and the frames after the last keyframe inside the span
(re-encoded). Only about one GOP per clip (Twitch: 2 s) is ever decoded or encoded, so a 30 s clip
costs little more than a stream copy while starting and ending on exactly the requested frames.

Copied and re-encoded packets share one MP4 track, so the re-encoded runs must be decodable with
the same sample description: x264 writes its parameter sets with id 7 (`sps-id`), and the track's
avcC carries both the source's sets and ours. A decoder picks the right pair per slice; nothing
relies on in-band parameter sets or on players honouring edit lists. Where that trick cannot hold
(another codec, a different output height, open GOPs, NVENC which cannot renumber its parameter
sets, a span without a whole GOP inside) the clip is decoded and re-encoded in full: correct,
only slower. docs/decisions.md has the measurement behind this choice.

Audio packets are copied (AAC/MP3) so sync is within one audio frame (21 ms at 48 kHz); other
audio codecs are re-encoded to AAC. Runs in the clips child process (klipstream.clips.worker), so
cancelling a job kills it mid-packet.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.container
import av.stream

from klipstream.clips.encoding import VideoEncoding

PARAM_SET_ID = 7  # the sps/pps id our re-encoded runs use, so both pairs live side by side in avcC
COPY_AUDIO = frozenset({"aac", "mp3"})
_NAL_SPS, _NAL_PPS = 7, 8


class CutError(Exception):
    """The source cannot be cut (no video, unreadable, or the span is outside it)."""


class EmptySpan(CutError):
    """No video frame lies in the requested span (e.g. past the end of the video)."""


class EncoderUnavailable(CutError):
    """The configured encoder cannot be opened here (e.g. NVENC without an NVIDIA GPU)."""


def _open(encoder: av.CodecContext) -> None:
    try:
        encoder.open()
    except av.error.FFmpegError as exc:
        raise EncoderUnavailable(f"The {encoder.name} encoder cannot be opened: {exc}") from None


@dataclass(frozen=True)
class SourceInfo:
    width: int
    height: int
    fps: Fraction
    origin: float  # source timestamp (s) of VOD time 0: the audio's start, as the audio pass counts
    duration: float | None
    video_codec: str
    audio_codec: str | None

    @property
    def frame_seconds(self) -> float:
        return float(1 / self.fps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "fps": float(self.fps),
            "fps_rational": [self.fps.numerator, self.fps.denominator],
            "duration": self.duration,
            "video_codec": self.video_codec,
            "audio_codec": self.audio_codec,
        }


@dataclass(frozen=True)
class CutResult:
    method: str  # "smart" (GOPs copied, edges re-encoded) or "reencode"
    frames: int
    encoded_frames: int
    first_pts: float  # source time (VOD clock) of the first frame
    duration: float


def probe(path: Path) -> SourceInfo:
    try:
        with av.open(str(path)) as container:
            return _probe_open(container)
    except av.error.FFmpegError as exc:
        raise CutError(f"The video file cannot be read: {exc}") from None


def _probe_open(container: av.container.InputContainer) -> SourceInfo:
    if not container.streams.video:
        raise CutError("The file has no video track.")
    video = container.streams.video[0]
    audio = container.streams.audio[0] if container.streams.audio else None
    fps = video.average_rate or video.guessed_rate or Fraction(30)
    origin = _stream_start(audio) if audio is not None else None
    if origin is None:
        origin = container.start_time / av.time_base if container.start_time is not None else 0.0
    duration = container.duration / av.time_base if container.duration else None
    return SourceInfo(
        width=video.codec_context.width,
        height=video.codec_context.height,
        fps=Fraction(fps).limit_denominator(1001),
        origin=origin,
        duration=duration,
        video_codec=video.codec_context.name,
        audio_codec=audio.codec_context.name if audio is not None else None,
    )


def _stream_start(stream: av.stream.Stream) -> float | None:
    if stream.start_time is None or stream.time_base is None:
        return None
    return float(stream.start_time * stream.time_base)


def output_size(source: SourceInfo, height: int) -> tuple[int, int]:
    """The clip's frame size: `height` (never above the source's), the source's aspect, even sides."""
    out_h = min(height, source.height)
    out_h -= out_h % 2
    out_w = round(source.width * out_h / source.height / 2) * 2
    return max(2, out_w), max(2, out_h)


# --------------------------------------------------------------------------------------------------
# Planning: which GOPs can be copied
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    copy_from: float  # source seconds; GOPs starting in [copy_from, copy_to) are copied
    copy_to: float

    @property
    def copies(self) -> bool:
        return self.copy_to > self.copy_from


_NO_COPY = _Plan(math.inf, math.inf)


_SEEK_MARGINS = (0.0, 3.0, 10.0, 30.0, 120.0)  # seconds before the target to seek to, tried in turn


@dataclass(frozen=True)
class _Scan:
    keys: list[float]  # keyframe times from the GOP holding the first frame on
    open_gop: bool
    seek_to: float  # a seek target that reaches keys[0]
    first_frame: int | None  # pts of the first frame of the clip (nearest to its start)
    reorder: int  # largest pts - dts seen: how far the source's decode order runs ahead (B-frames)


def _scan_keyframes(container: av.container.InputContainer, start: float, end: float, frame: float) -> _Scan:
    """Keyframe times (s) from the last one at or before `start` to the first after `end`.

    Also whether an open GOP was seen, the seek target that reaches that first keyframe, and the
    clip's first frame: the one starting nearest to `start`. Demuxing only: no frame is decoded.
    Seeking in MPEG-TS (no index) can land on a keyframe after the target, so earlier targets are
    tried until the first keyframe is early enough.
    """
    video = container.streams.video[0]
    tb = video.time_base
    assert tb is not None
    eps = frame / 2
    seconds_per_tick = float(tb)  # floats in the per-packet loops: Fraction arithmetic is slow
    for margin in _SEEK_MARGINS:
        target = max(0.0, start - margin)
        _seek(container, target)
        keys: list[float] = []
        open_gop = False
        first: int | None = None
        reorder = 0
        for packet in container.demux(video):
            if packet.pts is None:
                continue
            at = packet.pts * seconds_per_tick
            if packet.dts is not None:
                reorder = max(reorder, packet.pts - packet.dts)
            if start - eps <= at < end - eps and (first is None or packet.pts < first):
                first = packet.pts
            if packet.is_keyframe:
                keys.append(at)
                if at > end:
                    break
            elif keys and at < keys[-1]:
                open_gop = True  # a leading picture shown before its GOP's keyframe
        if keys and (keys[0] <= start + eps or target == 0.0):
            before = [k for k in keys if k <= start + eps]
            gop = before[-1] if before else keys[0]
            return _Scan([k for k in keys if k >= gop], open_gop, target, first, reorder)
    return _Scan([], False, 0.0, None, 0)


def _choose(keys: list[float], start: float, end: float, frame: float, smart_ok: bool) -> _Plan:
    if not smart_ok:
        return _NO_COPY
    eps = frame / 2
    inside = [k for k in keys if start - eps <= k <= end + eps]
    if len(inside) < 2:
        return _NO_COPY  # no complete GOP inside the span: nothing to copy
    return _Plan(inside[0] - eps, inside[-1] - eps)


def _seek(container: av.container.InputContainer, at: float) -> None:
    video = container.streams.video[0]
    assert video.time_base is not None
    container.seek(max(0, int(at / video.time_base)), stream=video, backward=True, any_frame=False)


# --------------------------------------------------------------------------------------------------
# Cutting
# --------------------------------------------------------------------------------------------------


def cut_clip(src: Path, dest: Path, start: float, end: float, *, height: int, encoding: VideoEncoding) -> CutResult:
    """Write [start, end) (VOD seconds) of `src` to `dest` as a faststart MP4."""
    try:
        with av.open(str(src)) as container:
            source = _probe_open(container)
            return _cut(container, source, dest, start, end, height, encoding)
    except av.error.FFmpegError as exc:
        raise CutError(f"Cutting {start:.2f}-{end:.2f} s failed: {exc}") from None


def _cut(
    container: av.container.InputContainer,
    source: SourceInfo,
    dest: Path,
    start: float,
    end: float,
    height: int,
    encoding: VideoEncoding,
) -> CutResult:
    vin = container.streams.video[0]
    ain = container.streams.audio[0] if container.streams.audio else None
    s, e = source.origin + start, source.origin + end  # source clock
    width, out_h = output_size(source, height)
    scan = _scan_keyframes(container, s, e, source.frame_seconds)
    if not scan.keys or scan.first_frame is None:
        raise EmptySpan(f"No video frames were found between {start:.2f} s and {end:.2f} s.")
    smart_ok = (
        encoding.can_smart_cut
        and source.video_codec == "h264"
        and out_h == source.height
        and width == source.width
        and vin.codec_context.pix_fmt in ("yuv420p", "yuvj420p")
        and not scan.open_gop
        and _source_param_ids(vin) is not None
        and PARAM_SET_ID not in (_source_param_ids(vin) or ())
    )
    plan = _choose(scan.keys, s, e, source.frame_seconds, smart_ok)
    writer = _ClipWriter(dest, source, vin, ain, s, e, width, out_h, encoding, plan, scan)
    try:
        _seek(container, scan.seek_to)
        streams = [vin] + ([ain] if ain is not None else [])
        for packet in container.demux(*streams):
            if not writer.feed(packet):
                break
        return writer.finish()
    finally:
        writer.close()


def _source_param_ids(stream: av.stream.Stream) -> tuple[int, ...] | None:
    """The SPS ids in the source's extradata (None if it has none we can read)."""
    extradata = stream.codec_context.extradata
    if not extradata:
        return None
    nals = _annexb_units(extradata) if extradata[:1] != b"\x01" else _avcc_units(extradata)
    ids = tuple(_sps_id(nal) for nal in nals if nal and nal[0] & 0x1F == _NAL_SPS)
    return ids or None


class _ClipWriter:
    """Receives the source packets in decode order and writes the clip."""

    def __init__(
        self,
        dest: Path,
        source: SourceInfo,
        vin: av.stream.Stream,
        ain: av.stream.Stream | None,
        s: float,
        e: float,
        width: int,
        height: int,
        encoding: VideoEncoding,
        plan: _Plan,
        scan: _Scan,
    ) -> None:
        self.source, self.vin, self.ain, self.s, self.e, self.plan = source, vin, ain, s, e, plan
        self.first_key = scan.keys[0]  # packets of earlier GOPs (the seek landed before it) are skipped
        self.width, self.height, self.encoding = width, height, encoding
        self.eps = source.frame_seconds / 2
        self.vtb = vin.time_base
        assert self.vtb is not None and scan.first_frame is not None
        self.base = scan.first_frame  # source pts of the clip's first frame, which becomes 0
        self.tick = float(self.vtb)  # seconds per timestamp unit, as a float for the per-packet paths
        self.start_seconds = self.base * self.tick
        self.frame_ticks = max(1, round(source.frame_seconds / self.vtb))
        self.out = av.open(str(dest), "w", format="mp4", options={"movflags": "+faststart"})
        # Re-encoded runs (no B-frames) get the source's pts-to-dts distance, so their decode
        # timestamps interleave with the copied packets' without colliding.
        self.reorder = scan.reorder if plan.copies else 0
        self.vout = self._video_stream()
        self.aout, self.aenc = self._audio_stream()
        self.audio_tick = float(ain.time_base) if ain is not None and ain.time_base is not None else 0.0
        self.encoder: av.CodecContext | None = None
        self.decoding = False  # the decoder holds frames of a run being re-encoded
        self.gop_key: float | None = None
        self.video_done = False
        self.audio_done = ain is None
        self.frames = 0
        self.encoded = 0
        self.first_pts: float | None = None
        self.last_video_pts = -math.inf
        self.last_dts: int | None = None
        self.bsf = self._annexb_filter()
        self.tail: list[av.Packet] = []

    # --- setup ---
    def _video_stream(self) -> av.stream.Stream:
        if self.plan.copies:
            stream = self.out.add_stream_from_template(self.vin)
            probe_encoder = self._new_encoder(global_header=True)
            ours = _annexb_units(probe_encoder.extradata or b"")
            theirs = self.vin.codec_context.extradata or b""
            units = _avcc_units(theirs) if theirs[:1] == b"\x01" else _annexb_units(theirs)
            stream.codec_context.extradata = b"".join(b"\x00\x00\x00\x01" + u for u in [*units, *ours])
            stream.time_base = self.vtb
            return stream
        stream = self.out.add_stream(self.encoding.codec, rate=self.source.fps)
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.time_base = self.vtb
        stream.codec_context.options = dict(self.encoding.options(full=True))
        _open(stream.codec_context)
        return stream

    def _annexb_filter(self) -> Any:
        """Copied packets must be Annex B like our extradata; MP4 sources store them length-prefixed."""
        if not self.plan.copies or (self.vin.codec_context.extradata or b"")[:1] != b"\x01":
            return None
        from av.bitstream import BitStreamFilterContext

        return BitStreamFilterContext("h264_mp4toannexb", self.vin)

    def _new_encoder(self, *, global_header: bool) -> av.CodecContext:
        encoder = av.CodecContext.create(self.encoding.codec, "w")
        encoder.width, encoder.height, encoder.pix_fmt = self.width, self.height, "yuv420p"
        encoder.time_base = self.vtb
        encoder.framerate = self.source.fps
        options = dict(self.encoding.options(full=False))
        options["x264-params"] = ":".join(
            filter(None, [options.get("x264-params", ""), f"sps-id={PARAM_SET_ID}", "bframes=0"])
        )
        encoder.options = options
        if global_header:
            encoder.flags |= av.codec.context.Flags.global_header
        _open(encoder)
        return encoder

    def _audio_stream(self) -> tuple[av.stream.Stream | None, av.CodecContext | None]:
        if self.ain is None:
            return None, None
        if self.ain.codec_context.name in COPY_AUDIO:
            stream = self.out.add_stream_from_template(self.ain)
            stream.time_base = self.ain.time_base
            return stream, None
        # Not an MP4-friendly codec (MP2 in MPEG-TS, Opus or Vorbis in WebM): decode and encode AAC.
        stream = self.out.add_stream("aac", rate=48_000, layout="stereo")
        return stream, stream.codec_context

    # --- packets ---
    def feed(self, packet: av.Packet) -> bool:
        """Take one source packet; False once both streams are past the end."""
        if packet.stream is self.vin:
            self._video(packet)
        elif packet.stream is self.ain:
            self._audio(packet)
        return not (self.video_done and self.audio_done)

    def _video(self, packet: av.Packet) -> None:
        if self.video_done:
            return
        if packet.pts is None and packet.dts is None:
            return
        at = packet.pts * self.tick if packet.pts is not None else None
        if packet.is_keyframe and at is not None:
            self.gop_key = at
            if at >= self.e - self.eps:
                self._flush_tail()
                self._end_run()
                self.video_done = True
                return
        if self.gop_key is None or self.gop_key < self.first_key - self.eps:
            return  # before the GOP that holds the first frame
        if self.plan.copy_from <= self.gop_key < self.plan.copy_to:
            self._end_run()
            self._copy(packet)
        elif self.plan.copies and self.gop_key >= self.plan.copy_to:
            self.tail.append(packet)  # the GOP the clip ends in: decided once it is complete
        else:
            self._decode(packet)

    def _flush_tail(self) -> None:
        """The last GOP: copy its longest decode-order prefix that shows exactly the first frames
        of the GOP and nothing past the end, and re-encode only the few frames after it (B-frames
        waiting for a reference that lies past the end). An IDR may start anywhere, so the
        re-encoded frames follow the copied ones in the same track.
        """
        packets, self.tail = self.tail, []
        limit = self.e - self.eps
        needed = sorted(p.pts for p in packets if p.pts is not None and p.pts * self.tick < limit)
        if not needed:
            return
        seen: set[int] = set()
        prefix, shown_to = 0, None
        for i, p in enumerate(packets):
            if p.pts is None or p.pts * self.tick >= limit:
                break  # never copy a frame past the end
            seen.add(p.pts)
            top = max(seen)
            if len(seen) == bisect.bisect_right(needed, top):
                prefix, shown_to = i + 1, top
        rest = [pts for pts in needed if shown_to is None or pts > shown_to]
        frames: list[av.VideoFrame] = []
        if rest:  # decode first: the bitstream filter of MP4 sources takes the packets it is given
            wanted = set(rest)
            decoder = self.vin.codec_context
            for i, p in enumerate(packets):
                decoder.skip_frame = "NONREF" if i < prefix else "DEFAULT"  # copied: needed only as references
                frames += [f for f in decoder.decode(p) if f.pts in wanted]
            decoder.skip_frame = "DEFAULT"
            frames += [f for f in decoder.decode(None) if f.pts in wanted]
            decoder.flush_buffers()
        for p in packets[:prefix]:
            self._copy(p)
        for frame in sorted(frames, key=lambda f: f.pts):
            self._take(frame)
        if self.encoder is not None:
            for out in self.encoder.encode(None):
                self._mux_encoded(out)
            self.encoder = None

    def _copy(self, packet: av.Packet) -> None:
        packets = self.bsf.filter(packet) if self.bsf is not None else [packet]
        for p in packets:
            assert p.pts is not None and p.dts is not None
            pts = p.pts - self.base
            if pts < 0 or p.pts * self.tick >= self.e - self.eps:
                continue  # cannot happen in a closed GOP inside the span; never write such a frame
            p.pts, p.dts = pts, p.dts - self.base
            self._count(pts, encoded=False)
            self._mux_video(p)

    def _decode(self, packet: av.Packet) -> None:
        self.decoding = True
        # Frames before the clip's first one are decoded only as references: skip the others.
        before = packet.pts is not None and packet.pts < self.base
        self.vin.codec_context.skip_frame = "NONREF" if before else "DEFAULT"
        for frame in self.vin.codec_context.decode(packet):
            self._take(frame)

    def _take(self, frame: av.VideoFrame) -> None:
        if frame.pts is None:
            return
        at = frame.pts * self.tick
        if frame.pts < self.base or at >= self.e - self.eps or frame.pts - self.base <= self.last_video_pts:
            return
        if self.encoder is None:
            self.encoder = self._new_encoder(global_header=self.plan.copies) if self.plan.copies else None
        if frame.width != self.width or frame.height != self.height or frame.format.name != "yuv420p":
            frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        pts = frame.pts - self.base
        frame.pts = pts
        frame.time_base = self.vtb
        frame.pict_type = av.video.frame.PictureType.NONE
        self._count(pts, encoded=True)
        if self.encoder is not None:
            for p in self.encoder.encode(frame):
                self._mux_encoded(p)
        else:
            for p in self.vout.encode(frame):
                self.out.mux(p)

    def _end_run(self) -> None:
        """Flush a re-encoded run: decoder first, then the encoder (a new one starts the next run)."""
        if not self.decoding:
            return
        self.decoding = False
        for frame in self.vin.codec_context.decode(None):
            self._take(frame)
        self.vin.codec_context.flush_buffers()
        if self.encoder is not None:
            for p in self.encoder.encode(None):
                self._mux_encoded(p)
            self.encoder = None

    def _mux_encoded(self, packet: av.Packet) -> None:
        assert packet.pts is not None
        packet.dts = packet.pts - self.reorder
        packet.time_base = self.vtb
        self._mux_video(packet)

    def _mux_video(self, packet: av.Packet) -> None:
        assert packet.dts is not None
        packet.duration = self.frame_ticks  # the last frame's duration ends the track
        if self.last_dts is not None and packet.dts <= self.last_dts:
            packet.dts = self.last_dts + 1
        self.last_dts = packet.dts
        packet.stream = self.vout
        self.out.mux(packet)

    def _count(self, pts: int, *, encoded: bool) -> None:
        self.frames += 1
        self.encoded += encoded
        self.last_video_pts = max(self.last_video_pts, pts)
        at = (pts + self.base) * self.tick
        self.first_pts = at if self.first_pts is None else min(self.first_pts, at)

    def _audio(self, packet: av.Packet) -> None:
        if self.audio_done or packet.pts is None or self.ain is None:
            return
        tb = self.ain.time_base
        assert tb is not None
        tick = self.audio_tick
        at = packet.pts * tick
        half = (packet.duration or 0) * tick / 2
        if at + half < self.start_seconds:
            return
        if at + half >= self.e - self.eps:
            self.audio_done = True
            return
        if self.aenc is not None:
            self._reencode_audio(packet)
            return
        base = round(self.start_seconds / tb)
        packet.pts -= base
        packet.dts = packet.pts
        packet.stream = self.aout
        self.out.mux(packet)

    def _reencode_audio(self, packet: av.Packet | None) -> None:
        assert self.ain is not None and self.aout is not None
        frames = self.ain.codec_context.decode(packet) if packet is not None else []
        for frame in frames:
            frame.pts = None  # the encoder counts samples from the clip's start
            for out in self.aout.encode(frame):
                self.out.mux(out)
        if packet is None:
            for out in self.aout.encode(None):
                self.out.mux(out)

    # --- end ---
    def finish(self) -> CutResult:
        self._flush_tail()
        self._end_run()
        if self.encoder is None and not self.plan.copies:
            for p in self.vout.encode(None):
                self.out.mux(p)
        if self.aenc is not None:
            self._reencode_audio(None)
        if self.frames == 0 or self.first_pts is None:
            raise EmptySpan(f"No video frames lie between {self.s - self.source.origin:.2f} s and the clip's end.")
        return CutResult(
            method="smart" if self.plan.copies else "reencode",
            frames=self.frames,
            encoded_frames=self.encoded,
            first_pts=self.first_pts - self.source.origin,
            duration=self.frames * self.source.frame_seconds,
        )

    def close(self) -> None:
        self.out.close()


# --------------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------------


def thumbnail(src: Path, dest: Path, at: float, *, height: int) -> float:
    """Write the frame shown at VOD time `at` as a JPEG `height` pixels high; returns its time."""
    try:
        with av.open(str(src)) as container:
            source = _probe_open(container)
            target = source.origin + at
            _seek(container, _scan_keyframes(container, target, target, source.frame_seconds).seek_to)
            chosen = _frame_near(container, target, source.frame_seconds)
            if chosen is None or chosen.time is None:
                raise CutError(f"No frame was found at {at:.2f} s.")
            width, out_h = output_size(source, height)
            image = chosen.reformat(width=width, height=out_h, format="yuvj420p")
            with av.open(str(dest), "w", format="image2", options={"update": "1"}) as out:
                stream = out.add_stream("mjpeg", rate=1)
                stream.width, stream.height, stream.pix_fmt = width, out_h, "yuvj420p"
                stream.codec_context.options = {"qmin": "2", "qmax": "4"}
                image.pts = 0
                for packet in stream.encode(image):
                    out.mux(packet)
                for packet in stream.encode(None):
                    out.mux(packet)
            return float(chosen.time) - source.origin
    except av.error.FFmpegError as exc:
        raise CutError(f"The thumbnail at {at:.2f} s could not be made: {exc}") from None


def _frame_near(container: av.container.InputContainer, target: float, frame: float) -> av.VideoFrame | None:
    """The decoded frame nearest to `target`; frames well before it are decoded only as references."""
    stream = container.streams.video[0]
    decoder = stream.codec_context
    tick = float(stream.time_base or 0)
    skip_before = target - 1.5 * frame
    chosen: av.VideoFrame | None = None

    def consider(frames: list[av.VideoFrame]) -> bool:
        nonlocal chosen
        for f in frames:
            if f.time is None:
                continue
            if chosen is None or f.time <= target + frame / 2:
                chosen = f
            if f.time >= target - frame / 2:
                return True
        return False

    for packet in container.demux(stream):
        if packet.pts is not None:
            decoder.skip_frame = "NONREF" if packet.pts * tick < skip_before else "DEFAULT"
        if consider(list(decoder.decode(packet))):
            return chosen
    decoder.skip_frame = "DEFAULT"
    consider(list(decoder.decode(None)))
    return chosen


# --------------------------------------------------------------------------------------------------
# H.264 parameter sets
# --------------------------------------------------------------------------------------------------


def _annexb_units(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes removed)."""
    units: list[bytes] = []
    for chunk in data.split(b"\x00\x00\x01"):
        chunk = chunk.rstrip(b"\x00")
        if chunk:
            units.append(chunk)
    return units


def _avcc_units(data: bytes) -> list[bytes]:
    """SPS and PPS units of an avcC record (ISO/IEC 14496-15)."""
    units: list[bytes] = []
    if len(data) < 7:
        return units
    pos = 5
    for count_mask in (0x1F, 0xFF):
        count = data[pos] & count_mask
        pos += 1
        for _ in range(count):
            size = int.from_bytes(data[pos : pos + 2], "big")
            units.append(data[pos + 2 : pos + 2 + size])
            pos += 2 + size
    return units


def _sps_id(sps: bytes) -> int:
    """seq_parameter_set_id: the first Exp-Golomb code after profile, constraints and level."""
    bits = _BitReader(_unescape(sps[4:]))
    return bits.ue()


def _unescape(data: bytes) -> bytes:
    return data.replace(b"\x00\x00\x03", b"\x00\x00")


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def bit(self) -> int:
        byte = self.data[self.pos >> 3] if (self.pos >> 3) < len(self.data) else 0
        self.pos += 1
        return (byte >> (7 - ((self.pos - 1) & 7))) & 1

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0 and zeros < 32:
            zeros += 1
        value = 1
        for _ in range(zeros):
            value = (value << 1) | self.bit()
        return value - 1

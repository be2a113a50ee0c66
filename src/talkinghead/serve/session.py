"""One live session: a timeline of frames, produced by one thread, sent as one audio + one video track.

**One media clock.** Frame ``n`` of the session is the instant ``n / fps`` of its timeline; the audio it was
rendered from is samples ``[round(n * 16000 / fps), round((n + 1) * 16000 / fps))`` of the same timeline.
Video frames carry ``pts = round(n * 90000 / fps)`` (90 kHz, as RTP video), audio frames (20 ms, 320 samples
at 16 kHz) ``pts`` = their first sample: both computed from integers, never accumulated, so they cannot drift
apart however long the session runs. Both tracks release a frame when the wall clock reaches ``t0 + pts``
(:class:`MediaClock`), so aiortc stamps its RTCP sender reports -- which the browser uses to line up the
tracks -- from the same instants.

**The producer** (:meth:`Session._produce`, a thread per session) has frame after frame rendered into a queue
of ``queue_frames`` slots (back-pressure: it waits for a free slot, nothing is unbounded). On the CPU the
server renders each session in a process of its own, forked from its zygote (:class:`ForkedRenderer`,
:mod:`talkinghead.serve.forked`: the avatar shared copy-on-write, the process gone with the session), so that
sessions render on as many cores as there are instead of taking turns at one GIL; the producer thread only
sends the frame's window of rows and waits for the image. Elsewhere (a GPU, no fork, a bare ``Session``) the
producer thread renders (:class:`Renderer`); both wrap the avatar's one streaming interface,
:class:`~talkinghead.methods.streaming.FrameStream`. The audio of a frame is
handed to the audio track only together with its rendered image, so sound never runs ahead of the lips. What
drives frame n:

* an **utterance** (upload or text) when one is queued: its features equal the offline ``render``'s
  (:func:`talkinghead.methods.streaming.utterance_features`); they are computed when it arrives, part by
  part (:func:`~talkinghead.methods.streaming.utterance_rows`: Whisper's 30 s windows, the encoder only as
  deep as the avatar reads), and it is queued once its first part is in; its frames follow one another from
  the next free frame on (a frame whose rows are still being computed waits for them);
* the **microphone** when the client sends one: chunks go through the avatar's live features
  (:meth:`~talkinghead.methods.streaming.DrivenAvatar.live_features`), computed in a process of their own
  forked from the zygote (:class:`ForkedLiveFeatures`: the Whisper encoder shared, its KV cache the
  session's; in this process they competed with the renderers and the event loop for the GIL and a third
  of the mic's frames were repeats) or, without a zygote, in the thread that receives the mic; mic sample j
  is timeline sample
  ``live_start + j`` where ``live_start`` is placed ``delay`` frames after the first chunk's arrival
  (``delay`` = the features' ``delay_frames`` + the method's look-ahead + 2 frames of margin), so that the row of
  a frame is normally there when the frame is due; the mic's sound is sent with the frames (the avatar
  speaks with your voice, in sync);
* otherwise **idle**: the training clip's pause row (:func:`~talkinghead.methods.streaming.pause_row`), with
  the training video's poses, blinks and eyes looping (ping-pong) -- the avatar keeps moving.

**Falling behind.** When a frame is already due when the producer reaches it (rendering slower than the
frame rate), it is not rendered: the previous image is sent again with the frame's own audio (``dropped``
in the stats). Sound stays continuous and the lips never lag more than one render. The renderer (its process,
or the producer thread when it renders) runs ``RENDER_NICE`` nicer than the rest of the server, so that
sending, the mic's features and an upload's features come first when the cores are busy; a producer thread
that only hands rows to a renderer process is not niced (niced, it woke late for every frame it waited on).

**Stats** (:meth:`Session.stats`): rendered fps, render ms, dropped frames, latency (mic chunk arrival ->
its frame leaving the server) p50 / p95, first frame after an upload, and the A/V figures: ``pts_drift_ms``
(video pts vs the pts of the audio the frame was rendered from: at most half a 90 kHz tick) and
``send_skew_ms`` (wall time between a video frame and the audio frame holding its first sample leaving).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from talkinghead.media import AUDIO_RATE
from talkinghead.methods.streaming import DrivenAvatar

VIDEO_CLOCK = 90000
AUDIO_FRAME = 320  # 20 ms at 16 kHz
# Niceness the producer threads add (Linux: per thread). On a busy machine the renderers then yield to what
# is waited on: the event loop sending frames on their instants, the mic features, an upload's features in the
# worker processes (its first frame), at the cost of a repeated image while those run.
RENDER_NICE = 5


def _lower_priority(by: int) -> None:
    """Make the calling thread ``by`` nicer (Linux threads have their own niceness; elsewhere: nothing)."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (AttributeError, OSError):
        pass


class MediaClock:
    """Wall-clock instants of timeline seconds: ``t0 + t``. Started by the first frame sent; when the sender
    is more than ``max_late`` s behind (the client was not reading), t0 moves so the tracks resume together."""

    def __init__(self, max_late: float = 0.5):
        self.t0: float | None = None
        self.max_late = max_late
        self.rebases = 0
        self.lock = threading.Lock()

    def start(self) -> float:
        with self.lock:
            if self.t0 is None:
                self.t0 = time.monotonic()
            return self.t0

    def due(self, t: float) -> float | None:
        """Wall instant of timeline second ``t`` (None before the clock started)."""
        return None if self.t0 is None else self.t0 + t

    async def wait(self, t: float) -> None:
        self.start()
        now = time.monotonic()
        with self.lock:
            late = now - (self.t0 + t)
            if late > self.max_late:
                self.t0 += late
                self.rebases += 1
                late = 0.0
        if late < 0:
            await asyncio.sleep(-late)


def frame_samples(n: int, fps: float) -> tuple[int, int]:
    """Timeline samples [a, b) of frame n."""
    return int(round(n * AUDIO_RATE / fps)), int(round((n + 1) * AUDIO_RATE / fps))


def video_pts(n: int, fps: float) -> int:
    return int(round(n * VIDEO_CLOCK / fps))


@dataclass
class Utterance:
    id: str
    wave: np.ndarray  # [S] float32 16 kHz
    rows: np.ndarray  # [T, D] normalised features (offline-equal); rows [0, ready) are computed
    received: float  # monotonic time the request arrived
    ready: int = 0
    failed: bool = False  # a later part's features failed: the utterance ends at `ready`
    first_sent: float | None = None


@dataclass
class _Frame:
    n: int
    image: np.ndarray  # [H, W, 3] uint8
    audio_start: int  # timeline sample of the frame's audio
    source: str  # "idle" | "utterance" | "mic"
    arrival: float | None = None  # mic: when the chunk holding the frame's audio arrived
    utterance: Utterance | None = None


@dataclass
class _Live:
    """The microphone's stream: features + the samples to echo, indexed from live_start."""

    features: object  # the avatar's live feature stream (DrivenAvatar.live_features)
    start_frame: int  # timeline frame of mic sample 0
    rows: list = field(default_factory=list)  # row arrays as emitted
    nrows: int = 0
    samples: collections.deque = field(default_factory=collections.deque)  # float32 chunks
    nsamples: int = 0
    consumed: int = 0  # mic samples already placed on the timeline
    arrivals: list = field(default_factory=list)  # (mic sample index at chunk end, monotonic arrival)
    last_chunk: float = 0.0
    ended: bool = False


def _percentiles(values, ps=(50, 95)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    arr = np.asarray(values, np.float64)
    return {f"p{p}": round(float(np.percentile(arr, p)), 2) for p in ps}


class Renderer:
    """A session's frames rendered in this process: the avatar's :class:`~talkinghead.methods.streaming.
    FrameStream` (the one streaming interface every method satisfies), its Condition built here."""

    def __init__(self, avatar: DrivenAvatar):
        self.avatar = avatar
        self.stream = avatar.open_stream()
        self.lookahead = int(self.stream.lookahead)
        self.pid = None  # this process

    def render(self, row: int, rows: np.ndarray, pose_step: int) -> np.ndarray:
        """The frame [H, W, 3] uint8 driven by ``rows[row]`` (rows [N, D]) with training pose ``pose_step``."""
        with torch.no_grad():
            img = self.stream.render(self.avatar.condition(row, rows, pose_step))
        return (img.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy()

    def reset(self) -> None:
        self.stream.reset()

    def close(self) -> None:
        self.stream = None


def _renderer_in_child(avatars: dict, name: str) -> Renderer:
    torch.set_num_threads(1)
    _lower_priority(RENDER_NICE)  # the whole (single-threaded) child
    return Renderer(avatars[name])


def _live_in_child(avatars: dict, name: str, params: dict):
    torch.set_num_threads(1)
    return avatars[name].live_features(**params)


class ForkedRenderer:
    """A :class:`Renderer` in a process of its own, forked from the server's zygote (:mod:`.forked`): sessions
    render on as many cores as there are, the avatar shared copy-on-write, the process gone with the session.
    Only the frame's window of rows (radius each side) travels; the image [H, W, 3] uint8 comes back."""

    def __init__(self, zygote, avatar: DrivenAvatar):
        self.radius = int(avatar.radius)
        self.child = zygote.spawn(_renderer_in_child, avatar.name, attrs=("lookahead",))
        self.lookahead, self.pid = int(self.child.info["lookahead"]), self.child.pid

    def render(self, row: int, rows: np.ndarray, pose_step: int) -> np.ndarray:
        R = self.radius  # the window DrivenAvatar.condition reads, so that condition(R, window) = condition(row, rows)
        window = np.ascontiguousarray(rows[np.clip(np.arange(row - R, row + R + 1), 0, len(rows) - 1)])
        return self.child.call("render", R, window, pose_step)

    def reset(self) -> None:
        self.child.call("reset")

    def close(self) -> None:
        self.child.close()


class ForkedLiveFeatures:
    """The avatar's live feature stream (:meth:`DrivenAvatar.live_features`) in a process of its own, forked
    from the zygote (the Whisper encoder shared copy-on-write, its KV cache the child's): its rows no longer
    compete with the renderers and the event loop for one GIL. ``push`` / ``flush`` / ``delay_frames`` as
    the stream's."""

    def __init__(self, zygote, avatar: DrivenAvatar, params: dict):
        self.child = zygote.spawn(_live_in_child, avatar.name, dict(params), attrs=("delay_frames",))
        self.delay_frames, self.pid = int(self.child.info["delay_frames"]), self.child.pid

    def push(self, samples: np.ndarray) -> np.ndarray:
        return self.child.call("push", np.asarray(samples, np.float32))

    def flush(self) -> np.ndarray:
        return self.child.call("flush")

    def close(self) -> None:
        self.child.close()


class Session:
    """One client's live avatar (see the module docstring). Created by the app, closed by it or by itself."""

    def __init__(self, avatar: DrivenAvatar, queue_frames: int = 2, mic_params: dict | None = None,
                 realtime: bool = True, extract=None, drop_late: bool = True, feature_pool=None, zygote=None):
        """``mic_params``: look-ahead / hop (/ context) of the live features, overriding the avatar's defaults
        (:meth:`DrivenAvatar.live_features`); ``extract``: the utterances' extractor (default the avatar's);
        ``feature_pool``: an executor whose workers compute the utterances' rows (the server's worker processes:
        pocketsphinx holds the GIL; None: here); ``zygote``: a :class:`~talkinghead.serve.forked.Zygote`
        holding the avatars by name, to render and to compute the mic's rows in processes of their own (None:
        here, the renderer in the producer thread)."""
        self.id = uuid.uuid4().hex[:12]
        self.avatar = avatar
        self.extract = extract or avatar.extract
        self.feature_pool = feature_pool
        self.zygote = zygote
        self.fps = avatar.fps
        self.renderer = ForkedRenderer(zygote, avatar) if zygote is not None else Renderer(avatar)
        self.clock = MediaClock()
        self.realtime = realtime
        self.mic_wait = 0.3  # s past its due time a frame waits for its mic row before it idles instead
        self.mic_late = 0  # frames sent idle because their mic row was late
        self.drop_late = drop_late  # False: every frame is rendered, the clock waits (benches of the content)
        self.slots = threading.Semaphore(queue_frames)
        self.queue_frames = queue_frames
        self.mic_params = dict(mic_params or {})
        self.utterances: collections.deque[Utterance] = collections.deque()
        self.lock = threading.Lock()
        self.live: _Live | None = None
        self.stop = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.video_q: asyncio.Queue | None = None
        self.audio_q: asyncio.Queue | None = None
        self.thread: threading.Thread | None = None
        self.created = time.monotonic()
        self.closed = False
        self.on_close: list = []
        # stats
        self.rendered = 0
        self.dropped = 0
        self.by_source = {k: [0, 0] for k in ("idle", "utterance", "mic")}  # source -> [frames, of them repeated]
        self.render_ms: collections.deque = collections.deque(maxlen=500)
        self.latency_ms: collections.deque = collections.deque(maxlen=2000)
        self.first_frame_ms: list = []
        self.video_sent: dict[int, float] = {}  # audio_start sample -> wall time its video frame left
        self.audio_sent: dict[int, float] = {}  # audio frame first sample -> wall time
        self.skew_ms: collections.deque = collections.deque(maxlen=2000)
        self.pts_drift_ms = 0.0
        self.frames_sent = 0
        self.error: str | None = None
        self.recorder = None  # optional callable(kind, pts, payload) for tests/benches

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.video_q, self.audio_q = asyncio.Queue(), asyncio.Queue()
        self.thread = threading.Thread(target=self._produce, name=f"session-{self.id}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        self.slots.release()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        # drop what holds memory now, even if the transport still references this object for a moment
        self.utterances.clear()
        self.video_q = self.audio_q = None
        if self.live is not None and hasattr(self.live.features, "close"):
            self.live.features.close()
        self.live = None
        self.renderer.close()  # a forked renderer's process exits: its memory is freed with it
        self.recorder = None
        for cb in self.on_close:
            cb(self)

    # ------------------------------------------------------------------------------ inputs

    def say(self, wave: np.ndarray, received: float, later=None) -> Utterance:
        """Queue an utterance known in full. Computes the rows of its first part here (call from a worker
        thread), queues it, then the later parts' rows (Whisper windows past the first 30 s) in ``later`` (an
        executor; None: here, before returning): the utterance starts while they are computed, and a frame
        waits for its rows only if they are not in when it is due (:meth:`_utterance_rows_ready`)."""
        from talkinghead.methods.streaming import utterance_parts

        parts = utterance_parts(wave, self.fps, self.extract)  # cheap: here
        first = self._utterance_rows(wave, 0)
        rows = np.zeros((parts[-1][1], first.shape[1]), np.float32)
        rows[parts[0][0]: parts[0][1]] = first
        u = Utterance(uuid.uuid4().hex[:12], wave, rows, received, ready=parts[0][1])
        with self.lock:
            self.utterances.append(u)

        def rest() -> None:
            try:
                for k, (a, b) in enumerate(parts[1:], 1):
                    if self.closed:
                        return
                    u.rows[a:b] = self._utterance_rows(wave, k)
                    u.ready = b  # after the rows: the producer reads rows below `ready` only
            except Exception:  # a worker died: the utterance stops where its rows stop, the session goes on
                import logging

                logging.getLogger("talkinghead.serve").exception("session %s: utterance features failed", self.id)
                u.failed = True

        if len(parts) > 1 and later is not None:
            later.submit(rest)
        elif len(parts) > 1:
            rest()
        return u

    def _utterance_rows(self, wave: np.ndarray, part: int) -> np.ndarray:
        """Rows of part ``part`` of an utterance (:func:`~talkinghead.methods.streaming.utterance_rows`), in a
        worker of ``feature_pool`` when there is one (the calling thread waits without the GIL)."""
        from talkinghead.methods.streaming import utterance_rows

        if self.feature_pool is None:
            return utterance_rows(wave, self.fps, self.extract, part)
        return self.feature_pool.submit(utterance_rows, wave, self.fps, self.extract, part).result()

    def _utterance_rows_ready(self, u: Utterance, frame: int) -> bool:
        """Wait until the rows utterance frame ``frame`` reads (its condition window, radius rows each side)
        are computed; False when they never will be (failed, or the session stops)."""
        need = min(len(u.rows), frame + int(getattr(self.avatar, "radius", 0)) + 1)
        while u.ready < need:
            if u.failed or self.stop.is_set():
                return False
            time.sleep(0.005)
        return True

    def mic_chunk(self, parts: list[tuple[np.ndarray, float]]) -> None:
        """Microphone audio: (16 kHz mono samples, arrival time) chunks, in order. Call from one worker thread:
        the features run here, so the caller hands over everything that arrived meanwhile in one call (a slow
        extractor then emits bigger blocks less often instead of falling further behind)."""
        if self.closed or not parts:
            return
        if self.live is None:
            if self.zygote is not None:
                features = ForkedLiveFeatures(self.zygote, self.avatar, self.mic_params)
            else:
                features = self.avatar.live_features(**self.mic_params)
            delay = features.delay_frames + self.renderer.lookahead + 2
            with self.lock:
                start = self._next_frame + delay
            self.live = _Live(features, start)
        live = self.live
        with self.lock:  # the sound is on the timeline at once; its rows follow when computed
            for x, arrival in parts:
                live.samples.append(np.asarray(x, np.float32))
                live.nsamples += x.size
                live.arrivals.append((live.nsamples, arrival))
                live.last_chunk = arrival
        try:
            rows = live.features.push(np.concatenate([x for x, _ in parts]))
        except Exception:
            if self.closed:  # closed meanwhile: its feature process is gone
                return
            raise
        if rows.size:
            with self.lock:
                live.rows.append(rows)
                live.nrows += rows.shape[0]

    def mic_ended(self) -> None:
        if self.live is not None:
            rows = self.live.features.flush()
            with self.lock:
                if rows.size:
                    self.live.rows.append(rows)
                    self.live.nrows += rows.shape[0]
                self.live.ended = True

    # ------------------------------------------------------------------------------ the producer

    _next_frame = 0

    def _live_row(self, n: int, give_up: bool = False) -> tuple[np.ndarray | None, np.ndarray, float] | None | str:
        """For timeline frame n in mic mode: (rows so far, the frame's mic samples, arrival) when ready,
        "wait" when its row is still coming (with ``give_up``: rows None, the samples anyway), None when the
        mic does not drive frame n."""
        live = self.live
        if live is None or n < live.start_frame:
            return None
        r = n - live.start_frame
        a, b = frame_samples(r, self.fps)
        with self.lock:
            if r >= live.nrows:
                if live.ended or time.monotonic() - live.last_chunk > 1.0:
                    return None  # the mic went quiet (track ended or stalled): idle
                if not give_up:
                    return "wait"
                rows = None
            else:
                rows = np.concatenate(live.rows) if len(live.rows) > 1 else live.rows[0]
                live.rows = [rows]
            # take the mic samples [a, b) off the queue; those before a were covered by an utterance: dropped
            self._take(live, a - live.consumed)
            audio = self._take(live, b - a)
            audio = np.pad(audio, (0, (b - a) - audio.size))
            live.consumed = b
            arrival = next((t for s, t in live.arrivals if s >= a + 1), None)
            live.arrivals = [(s, t) for s, t in live.arrivals if s > a]
        return rows, audio, arrival

    @staticmethod
    def _take(live: _Live, count: int) -> np.ndarray:
        """Pop up to ``count`` mic samples (fewer when the mic has not sent them yet)."""
        got = []
        while count > 0 and live.samples:
            c = live.samples[0]
            if c.size <= count:
                got.append(live.samples.popleft())
                count -= c.size
            else:
                got.append(c[:count])
                live.samples[0] = c[count:]
                count = 0
        return np.concatenate(got) if got else np.zeros(0, np.float32)

    def _produce(self) -> None:
        torch.set_num_threads(1)
        if self.renderer.pid is None:  # renders here: this thread yields. A forked renderer is nicer itself and
            _lower_priority(RENDER_NICE)  # this thread only hands over rows: niced, it woke late for every frame
        av = self.avatar
        idle_rows = av.silence[None]
        last_image: np.ndarray | None = None
        utt: Utterance | None = None
        utt_frame = 0
        prev_source = "idle"
        n = 0
        try:
            while not self.stop.is_set():
                if not self.slots.acquire(timeout=0.2):
                    continue
                if self.stop.is_set():
                    break
                self._next_frame = n
                a, b = frame_samples(n, self.fps)
                source, arrival = "idle", None
                audio = np.zeros(b - a, np.float32)
                rows, row = idle_rows, 0
                if utt is None:
                    with self.lock:
                        utt = self.utterances.popleft() if self.utterances else None
                    utt_frame = 0
                if utt is not None and not self._utterance_rows_ready(utt, utt_frame):
                    utt = None  # its later rows failed: back to idle (or the session is stopping)
                if utt is not None:
                    source, rows, row = "utterance", utt.rows, utt_frame
                    s0 = frame_samples(utt_frame, self.fps)[0]
                    seg = utt.wave[s0: s0 + (b - a)]
                    audio[: seg.size] = seg
                else:
                    live = self._live_row(n)
                    give_up = time.monotonic() + self.mic_wait
                    while live == "wait" and not self.stop.is_set():
                        time.sleep(0.005)
                        due = self.clock.due(n / self.fps)
                        live = self._live_row(n, give_up=time.monotonic() > max(give_up, due or 0) + self.mic_wait)
                    if isinstance(live, tuple):
                        live_rows, audio, arrival = live
                        if live_rows is None:  # features late: the sound goes out on time, the mouth idles
                            self.mic_late += 1
                        else:
                            rows, row, source = live_rows, n - self.live.start_frame, "mic"
                if source != prev_source or (source == "utterance" and utt_frame == 0):
                    self.renderer.reset()  # a new utterance starts afresh, as the offline render does
                prev_source = source
                due = self.clock.due(n / self.fps)
                late = due is not None and time.monotonic() > due
                if self.realtime and self.drop_late and last_image is not None and late:
                    image = last_image  # already late: send the last image with this frame's audio
                    self.dropped += 1
                    self.by_source[source][1] += 1
                else:
                    t = time.perf_counter()
                    image = self.renderer.render(row, rows, n)
                    self.render_ms.append((time.perf_counter() - t) * 1000)
                    self.rendered += 1
                    last_image = image
                self.by_source[source][0] += 1
                frame = _Frame(n, image, a, source, arrival, utt)
                if utt is not None:
                    utt_frame += 1
                    if utt_frame >= len(utt.rows):
                        utt = None
                self._deliver(frame, audio)
                n += 1
        except Exception as exc:  # a render failure ends this session only; the server keeps serving
            import logging

            if self.stop.is_set():  # closed while a frame was rendering (a forked renderer is gone): no failure
                return
            logging.getLogger("talkinghead.serve").exception("session %s: the producer failed", self.id)
            self.error = f"{type(exc).__name__}: {exc}"
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.close)

    def _deliver(self, frame: _Frame, audio: np.ndarray) -> None:
        loop = self.loop
        if loop is None or loop.is_closed() or self.video_q is None:
            return
        vq, aq = self.video_q, self.audio_q
        try:
            loop.call_soon_threadsafe(vq.put_nowait, frame)
            loop.call_soon_threadsafe(aq.put_nowait, (frame.audio_start, audio))
        except RuntimeError:  # the loop closed meanwhile
            pass

    # ------------------------------------------------------------------------------ the tracks' side

    async def next_video(self):
        """(pts, image) of the next frame, released at its instant on the media clock."""
        frame: _Frame = await self.video_q.get()
        self.slots.release()
        if self.realtime:
            await self.clock.wait(frame.n / self.fps)
        now = time.monotonic()
        pts = video_pts(frame.n, self.fps)
        self.pts_drift_ms = max(self.pts_drift_ms, abs(pts / VIDEO_CLOCK - frame.audio_start / AUDIO_RATE) * 1000)
        self.frames_sent += 1
        if frame.arrival is not None:
            self.latency_ms.append((now - frame.arrival) * 1000)
        if frame.utterance is not None and frame.utterance.first_sent is None:
            frame.utterance.first_sent = now
            self.first_frame_ms.append(round((now - frame.utterance.received) * 1000, 1))
        self._pair(frame.audio_start, now, video=True)
        if self.recorder is not None:
            self.recorder("video", frame.n, frame)
        return pts, frame.image

    async def next_audio(self, state: dict):
        """(pts, int16 samples [320]) of the next 20 ms audio frame, released at its instant."""
        k = state.setdefault("k", 0)
        buf: collections.deque = state.setdefault("buf", collections.deque())
        start = k * AUDIO_FRAME
        while not buf or buf[-1][0] + buf[-1][1].size < start + AUDIO_FRAME:
            buf.append(await self.audio_q.get())
        out = np.zeros(AUDIO_FRAME, np.float32)
        for s, samples in buf:  # copy the overlap of [start, start + 320) with each chunk
            lo, hi = max(start, s), min(start + AUDIO_FRAME, s + samples.size)
            if hi > lo:
                out[lo - start: hi - start] = samples[lo - s: hi - s]
        while buf and buf[0][0] + buf[0][1].size <= start + AUDIO_FRAME:
            buf.popleft()
        state["k"] = k + 1
        if self.realtime:
            await self.clock.wait(start / AUDIO_RATE)
        self._pair(start, time.monotonic(), video=False)
        if self.recorder is not None:
            self.recorder("audio", start, out)
        return start, (np.clip(out, -1, 1) * 32767).astype(np.int16)

    def _pair(self, sample: int, when: float, video: bool) -> None:
        """Send skew: a video frame whose audio starts at ``sample`` vs the audio frame holding that sample."""
        if video:
            key = sample // AUDIO_FRAME * AUDIO_FRAME
            self.video_sent[key] = when
            other = self.audio_sent.pop(key, None)
            if other is not None:
                self.video_sent.pop(key)
                self.skew_ms.append((when - other) * 1000)
        else:
            other = self.video_sent.pop(sample, None)
            if other is not None:
                self.skew_ms.append((other - when) * 1000)
            elif len(self.audio_sent) < 10000:
                self.audio_sent[sample] = when
        if len(self.audio_sent) > 5000:  # frames whose video partner never comes (no 20 ms boundary)
            for key in sorted(self.audio_sent)[:2500]:
                self.audio_sent.pop(key)

    def stats(self) -> dict:
        elapsed = max(time.monotonic() - self.created, 1e-9)
        skew = [abs(s) for s in self.skew_ms]
        return {
            "session": self.id, "avatar": self.avatar.name, "fps_target": self.fps,
            "frames_sent": self.frames_sent, "frames_rendered": self.rendered, "frames_dropped": self.dropped,
            "frames_by_source": {k: {"frames": v[0], "repeated": v[1]} for k, v in self.by_source.items()},
            "fps_rendered": round(self.rendered / elapsed, 2),
            "render_ms": _percentiles(list(self.render_ms)),
            "latency_ms": _percentiles(list(self.latency_ms)),
            "first_frame_ms": self.first_frame_ms[-1] if self.first_frame_ms else None,
            "pts_drift_ms": round(self.pts_drift_ms, 4),
            "send_skew_ms": {"max": round(max(skew), 2) if skew else None, **_percentiles(skew)},
            "clock_rebases": self.clock.rebases,
            "queued_utterances": len(self.utterances),
            "mic": self.live is not None, "mic_rows_late": self.mic_late,
            "error": self.error,
        }


def video_frame(pts: int, image: np.ndarray):
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame.pts, frame.time_base = pts, Fraction(1, VIDEO_CLOCK)
    return frame


def audio_frame(pts: int, samples: np.ndarray):
    import av

    frame = av.AudioFrame(format="s16", layout="mono", samples=samples.size)
    frame.planes[0].update(samples.tobytes())
    frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, pts, Fraction(1, AUDIO_RATE)
    return frame

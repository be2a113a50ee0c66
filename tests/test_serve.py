"""The live server over loopback: API, WebRTC frames that move, speech in, bad input and faults, the clock.

A real aiortc client (talkinghead.serve.client) talks to a real server on 127.0.0.1 with the tiny avatars of
test_streaming. The browser test is tests/test_serve_browser.py.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import time
import weakref

import numpy as np
import pytest
import soundfile
import torch

pytest.importorskip("aiortc", reason="talkinghead serve needs aiortc (pip install -r requirements.txt)")
pytest.importorskip("aiohttp", reason="talkinghead serve needs aiohttp (pip install -r requirements.txt)")

from talkinghead.media import AUDIO_RATE  # noqa: E402
from talkinghead.serve.session import VIDEO_CLOCK, frame_samples, video_pts  # noqa: E402
from talkinghead.serve.speech import SpeechError, UploadLimits, decode_upload  # noqa: E402

from test_streaming import avatars, speechlike  # noqa: F401,E402  (the session-scoped avatar fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wav_bytes(wave: np.ndarray, rate: int = AUDIO_RATE, fmt: str = "WAV") -> bytes:
    b = io.BytesIO()
    soundfile.write(b, wave, rate, format=fmt)
    return b.getvalue()


def test_uploads_are_checked_with_one_clear_error_each():
    ok = speechlike(1.0)
    np.testing.assert_allclose(decode_upload(wav_bytes(ok)), ok, atol=1e-4)
    cases = [
        (wav_bytes(speechlike(3.0)), UploadLimits(max_bytes=50_000), 413, "limit is"),
        (b"this is plain text, not audio" * 20, UploadLimits(), 415, "not a readable audio file"),
        (b"", UploadLimits(), 415, "empty"),
        (wav_bytes(np.zeros(AUDIO_RATE, np.float32)), UploadLimits(), 422, "silent"),
        (wav_bytes(speechlike(3.0)), UploadLimits(max_seconds=2.0), 422, "longer than 2 s"),
        (wav_bytes(speechlike(1.0)[::4], rate=4000), UploadLimits(), 422, "4000 Hz"),
    ]
    for data, limits, status, words in cases:
        with pytest.raises(SpeechError, match=words) as err:
            decode_upload(data, limits)
        assert err.value.status == status
    # another container decodes too (FLAC at 44.1 kHz -> 16 kHz)
    t = np.arange(44100) / 44100
    w = decode_upload(wav_bytes((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 44100, "FLAC"))
    assert abs(w.size - AUDIO_RATE) < 50


def test_one_media_clock_video_and_audio_pts_never_drift_over_ten_minutes():
    for fps in (25.0, 30000 / 1001):
        n = np.arange(int(600 * fps))
        v = np.array([video_pts(i, fps) for i in n[:: 997]]) / VIDEO_CLOCK
        a = np.array([frame_samples(i, fps)[0] for i in n[:: 997]]) / AUDIO_RATE
        assert np.abs(v - a).max() <= 0.5 / VIDEO_CLOCK + 0.5 / AUDIO_RATE  # rounding only, never accumulating
        ends = [frame_samples(i, fps) for i in n[-3:]]
        assert ends[0][1] == ends[1][0] and ends[1][1] == ends[2][0]  # frames tile the audio without gaps


@pytest.fixture(scope="module")
def live(avatars):  # noqa: F811
    """A server with both tiny avatars, --max-sessions 2, feature extraction in one worker process."""
    from talkinghead.methods.streaming import DrivenAvatar
    from talkinghead.serve.app import Server
    from talkinghead.serve.client import ServerThread

    loaded = [DrivenAvatar(avatars["gt"]), DrivenAvatar(avatars["gft"])]
    server = Server(loaded, max_sessions=2, limits=UploadLimits(max_bytes=400_000, max_seconds=20))
    server.start_workers(1)
    thread = ServerThread(server).start()
    yield thread
    thread.stop()
    server.workers.shutdown(wait=True, cancel_futures=True)


def _run(coro):
    return asyncio.run(coro)


def _moving(frames) -> float:
    """Largest mean absolute difference between the first received image and the later ones (0..255)."""
    imgs = [f[2].astype(np.float32) for f in frames if f[2] is not None]
    return max(np.abs(im - imgs[0]).mean() for im in imgs[1:])


def test_api_frames_move_speech_plays_and_each_bad_request_gets_one_answer(live):
    from talkinghead.serve.client import Client

    async def scenario():
        c = Client(live.base)
        listed = await c.avatars()
        assert [(a["name"], a["method"], a["fps"], a["size"]) for a in listed] == [
            ("gt", "gaussiantalker", 25.0, 64), ("gft", "gaussianflametalk", 25.0, 64)]
        assert {a["name"]: a["lookahead_frames"] for a in listed} == {"gt": 2, "gft": 0}
        status, body = await c.connect("gt")
        assert status == 200 and body["type"] == "answer" and "m=video" in body["sdp"] and "m=audio" in body["sdp"]
        assert await c.wait_frames(20, timeout=60) >= 20
        assert _moving(c.received.video) > 1.0  # the idle pose loop turns the head
        assert c.received.audio and c.received.audio[0][1] == 48000  # Opus comes back at 48 kHz
        # speech: a file, then text
        status, body = await c.speak(wav_bytes(speechlike(1.5)))
        assert status == 200 and body["duration_s"] == 1.5 and len(body["utterance"]) == 12
        status, body = await c.say("Hello from the test.")
        assert status == 200 and 0.5 < body["duration_s"] < 5
        # one answer per bad request; the session keeps streaming through them
        sid = c.session
        for data, ctype, code, words in [
            (b"x" * 500_000, "audio/wav", 413, "larger than"),
            (b"not audio at all" * 10, "audio/wav", 415, "not a readable audio file"),
            (wav_bytes(np.zeros(AUDIO_RATE, np.float32)), "audio/wav", 422, "silent"),
            (b'{"txt": 1}', "application/json", 400, "text"),
        ]:
            status, body = await c.speak(data, ctype)
            assert status == code and words in body["error"], (status, body)
        assert (await c._json("POST", "/api/sessions", json={"avatar": "nobody", "sdp": "x", "type": "offer"}))[0] == 404
        assert (await c._json("POST", "/api/sessions", data=b"{oops"))[0] == 400
        assert (await c._json("GET", "/api/sessions/deadbeef/stats"))[0] == 404
        before = len(c.received.video)
        await asyncio.sleep(4.0)  # the utterances play
        status, stats = await c.stats()
        assert status == 200 and stats["session"] == sid and stats["error"] is None
        assert stats["first_frame_ms"] is not None and stats["first_frame_ms"] > 0
        # Every frame sent was rendered or repeated (dropped when late); at most queue_frames (2) wait in the
        # queue and one for its instant on the clock, so rendering may run that far ahead, never further.
        assert stats["frames_rendered"] > 0
        assert 0 <= stats["frames_rendered"] + stats["frames_dropped"] - stats["frames_sent"] <= 3, stats
        by = stats["frames_by_source"]  # every produced frame counted once, under what drove it
        produced = stats["frames_rendered"] + stats["frames_dropped"]  # (the producer runs on: one frame apart at most)
        assert abs(produced - sum(v["frames"] for v in by.values())) <= 1, stats
        assert abs(stats["frames_dropped"] - sum(v["repeated"] for v in by.values())) <= 1, stats
        assert by["utterance"]["frames"] > 0
        assert stats["pts_drift_ms"] < 0.02  # video pts vs the pts of the audio it was rendered from
        assert len(c.received.video) > before
        assert (await c._json("DELETE", f"/api/sessions/{sid}"))[1] == {"closed": sid}
        assert (await c._json("GET", f"/api/sessions/{sid}/stats"))[0] == 404
        await c.close(delete=False)

    _run(scenario())
    assert live.server.sessions == {}


def test_too_many_sessions_and_a_vanished_client_leave_the_others_served(live):
    from talkinghead.serve.client import Client

    async def scenario():
        a, b, c = Client(live.base, keep_images=False), Client(live.base, keep_images=False), Client(live.base)
        assert (await a.connect("gt"))[0] == 200
        assert (await b.connect("gft"))[0] == 200
        status, body = await c.connect("gt")
        assert status == 503 and "--max-sessions" in body["error"]
        await a.wait_frames(5, 60)
        await b.wait_frames(5, 60)
        ref = weakref.ref(live.server.sessions[b.session])
        pids = [live.server.sessions[x.session].renderer.pid for x in (a, b)]
        assert live.server.zygote is None or None not in pids and len(set(pids)) == 2  # a process each
        await b.vanish()  # no DELETE, no goodbye: ICE consent checks find it gone
        end = time.monotonic() + 30
        while b.session in live.server.sessions and time.monotonic() < end:
            await asyncio.sleep(0.25)
        assert b.session not in live.server.sessions
        for _ in range(40):  # its memory goes too (aiortc's sender tasks take a moment to wind down)
            gc.collect()
            if ref() is None:
                break
            await asyncio.sleep(0.25)
        assert ref() is None
        if pids[1] is not None:  # its renderer process exited (reaped by the zygote): its memory is freed
            while os.path.exists(f"/proc/{pids[1]}") and time.monotonic() < end:
                await asyncio.sleep(0.1)
            assert not os.path.exists(f"/proc/{pids[1]}") and os.path.exists(f"/proc/{pids[0]}")
        n = len(a.received.video)
        await asyncio.sleep(1.5)
        assert len(a.received.video) > n  # the other session never stopped
        assert (await c.connect("gt"))[0] == 200  # and the freed place is taken
        assert await c.wait_frames(3, 60) >= 3
        await a.close()
        await c.close()

    _run(scenario())


def test_the_microphone_drives_the_avatar_with_its_latency_in_the_stats(live, clip):
    from talkinghead.media import read_audio
    from talkinghead.serve.client import Client

    wave = read_audio(clip("speech_en_imagine_6s.wav"))[: 3 * AUDIO_RATE]

    async def scenario():
        c = Client(live.base, keep_images=False)
        assert (await c.connect("gt", mic_wave=wave, mic_lead_s=0.5))[0] == 200
        end = time.monotonic() + 40
        stats = {}
        spoke = False
        while time.monotonic() < end:
            await asyncio.sleep(0.5)
            stats = (await c.stats())[1]
            if stats["mic"] and not spoke:  # an upload in the middle of the mic stream takes over, then the mic
                assert (await c.speak(wav_bytes(speechlike(0.6))))[0] == 200
                spoke = True
            if stats["mic"] and stats["latency_ms"]["p50"] is not None and stats["frames_sent"] > 80:
                break
        assert stats["mic"] and stats["latency_ms"]["p50"] > 0 and stats["error"] is None, stats
        await asyncio.sleep(1.0)
        status, stats = await c.stats()
        assert status == 200 and stats["error"] is None and stats["first_frame_ms"] is not None
        await c.close()

    _run(scenario())


class _Gated:
    """An utterance extractor in two parts whose second part waits for ``gate``: row i holds i + 1."""

    def __init__(self, split: int):
        import threading

        self.split, self.gate = split, threading.Event()

    def parts(self, wave, fps, n):
        return [(0, self.split), (self.split, n)]

    def rows(self, wave, fps, n, part):
        a, b = self.parts(wave, fps, n)[part]
        if part == 1:
            assert self.gate.wait(60)
        return (np.arange(a, b, dtype=np.float32) + 1)[:, None]


class _ValueAvatar:
    """Just enough of DrivenAvatar for a Session: frame = the row's value as the pixel value; condition() notes
    any frame whose window (radius rows each side) read a row not computed yet (0)."""

    name, method, fps, radius, size = "value", "stub", 25.0, 2, 4

    def __init__(self):
        self.silence = np.zeros(1, np.float32)
        self.unready_reads = 0
        self.nice: list[int] = []  # the niceness of the thread each frame was rendered in

    def open_stream(self):
        nice = self.nice

        class Stream:
            lookahead = 2

            def render(self, value):
                import os
                import threading

                nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
                return torch.full((4, 4, 3), value / 255.0)

            def reset(self):
                pass

        return Stream()

    def condition(self, row, rows, n):
        if rows.shape[0] > 1:  # an utterance (idle: the one pause row)
            window = rows[np.clip(np.arange(row - self.radius, row + self.radius + 1), 0, len(rows) - 1)]
            self.unready_reads += int((window == 0).any())
        return float(rows[row, 0])


def test_an_utterance_starts_before_its_later_parts_rows_are_computed():
    """The first frame of an upload does not wait for the whole utterance's features: with the second part's
    rows held back, the first part's frames are sent (all those whose window stays inside it); released, the
    rest follow, every frame with its own row and no frame reading a row before it was computed. Frames are
    rendered in a thread RENDER_NICE nicer than the caller's."""
    from concurrent.futures import ThreadPoolExecutor

    from talkinghead.serve.session import Session

    av, ext = _ValueAvatar(), _Gated(split=10)
    s = Session(av, realtime=False, extract=ext)
    later = ThreadPoolExecutor(1)

    async def values_until(stop: int) -> list[int]:
        got = []
        while not got or got[-1] != stop:
            _, img = await asyncio.wait_for(s.next_video(), 60)
            if img[0, 0, 0] or got:
                got.append(int(img[0, 0, 0]))
        return got

    async def scenario():
        loop = asyncio.get_running_loop()
        s.start(loop)
        u = await asyncio.wait_for(loop.run_in_executor(None, s.say, speechlike(1.0), time.monotonic(), later), 60)
        assert u.ready == 10 and len(u.rows) == 25
        before = await values_until(10 - av.radius)  # frames 0..7: their windows end inside part 0
        assert not ext.gate.is_set() and u.ready == 10
        ext.gate.set()
        after = await values_until(25)
        return before, after

    try:
        before, after = _run(scenario())
    finally:
        ext.gate.set()
        s.close()
        later.shutdown()
    assert before == list(range(1, 9)) and after == list(range(9, 26))
    assert av.unready_reads == 0
    import os

    if hasattr(os, "getpriority"):  # the renderer yields to sending and to the features (Linux: per thread)
        from talkinghead.serve.session import RENDER_NICE

        assert set(av.nice) == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + RENDER_NICE)}


def test_the_voice_is_loaded_ahead_of_the_first_typed_utterance():
    import threading

    from talkinghead.serve.speech import TextToSpeech

    tts = TextToSpeech()
    if tts.available():
        pytest.skip(tts.available())
    tts.warm()
    for t in threading.enumerate():
        if t.name == "tts-warm":
            t.join(120)
    voice = tts._voice
    assert voice is not None
    wave = tts.synthesize("Ready.")
    assert tts._voice is voice and wave.dtype == np.float32 and 0.2 < wave.size / AUDIO_RATE < 3


def test_a_forked_renderer_and_mic_stream_equal_the_in_process_ones_and_go_with_their_session(avatars):  # noqa: F811
    """Sessions render (and compute the mic's rows) in processes forked from the zygote: the same frames and rows
    as in this process, bit for bit (GaussianFlameTalk: its causal state, reset included), the renderer RENDER_NICE
    nicer, the avatar's pages shared with the parent, and the processes gone once closed."""
    import os

    from talkinghead.methods.streaming import DrivenAvatar
    from talkinghead.serve.forked import Zygote, process_memory_mb
    from talkinghead.serve.session import RENDER_NICE, ForkedLiveFeatures, ForkedRenderer, Renderer

    av = DrivenAvatar(avatars["gft"])
    zygote = Zygote({av.name: av})
    try:
        here, there = Renderer(av), ForkedRenderer(zygote, av)
        assert there.pid not in (None, os.getpid()) and there.lookahead == here.lookahead
        rows = np.random.default_rng(0).normal(size=(12, av.silence.size)).astype(np.float32)
        got = []
        for r in (here, there):
            frames = [r.render(i, rows, i) for i in range(6)]
            r.reset()
            got.append(frames + [r.render(3, rows, 0)])
        assert all(a.dtype == np.uint8 and np.array_equal(a, b) for a, b in zip(*got))
        assert not np.array_equal(got[0][0], got[0][5])  # the frames differ: the comparison has teeth
        if hasattr(os, "getpriority"):
            assert os.getpriority(os.PRIO_PROCESS, there.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + RENDER_NICE)
        mem = process_memory_mb(there.pid)
        if mem is not None:
            assert 0 < mem["private"] < mem["rss"]  # it maps the parent's pages without copying them
        wave = speechlike(2.0)
        local, forked = av.live_features(), ForkedLiveFeatures(zygote, av, {})
        assert forked.delay_frames == local.delay_frames
        outs = []
        for stream in (local, forked):
            parts = [stream.push(wave[i: i + 640]) for i in range(0, wave.size, 640)] + [stream.flush()]
            outs.append(np.concatenate([p for p in parts if p.size]))
        assert outs[0].shape[0] == 50 and np.array_equal(outs[0], outs[1])
        pids = [there.pid, forked.pid]
        there.close()
        forked.close()
        end = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < end:
            time.sleep(0.1)
            alive = [p for p in alive if os.path.exists(f"/proc/{p}")]
        assert not alive  # exited and reaped: what they held is freed
    finally:
        zygote.close()


def test_without_a_zygote_a_session_renders_and_hears_the_mic_in_this_process(avatars):  # noqa: F811
    """The in-process path (a GPU, no fork): the producer thread renders, the mic's rows are computed in the
    thread that feeds them; one second of mic gives its 25 consecutive frames, driven by the mic."""
    from talkinghead.methods.streaming import DrivenAvatar
    from talkinghead.serve.session import Session

    av = DrivenAvatar(avatars["gft"])
    s = Session(av, realtime=False)
    assert s.renderer.pid is None
    wave = speechlike(1.0)
    frames: list = []
    s.recorder = lambda kind, n, frame: frames.append(frame) if kind == "video" else None

    async def scenario():
        loop = asyncio.get_running_loop()
        s.start(loop)
        await loop.run_in_executor(None, s.mic_chunk, [(wave, time.monotonic())])
        await loop.run_in_executor(None, s.mic_ended)
        assert s.live is not None and not hasattr(s.live.features, "pid")  # computed here
        while not frames or frames[-1].source != "idle" or not any(f.source == "mic" for f in frames):
            await asyncio.wait_for(s.next_video(), 60)

    try:
        _run(scenario())
    finally:
        s.close()
    mic = [f for f in frames if f.source == "mic"]
    assert len(mic) == 25 and [f.n for f in mic] == list(range(mic[0].n, mic[0].n + 25))

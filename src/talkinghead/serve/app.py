"""The HTTP side of ``talkinghead serve``: the page, the JSON API, WebRTC signalling, session bookkeeping.

API (also in the README):

* ``GET /api/avatars`` -> ``[{name, method, fps, size, lookahead_frames}]``
* ``POST /api/sessions`` ``{avatar, sdp, type}`` (a WebRTC offer) -> ``{session, sdp, type}`` (the answer).
  The answer carries one video and one audio track; an audio track in the offer is the microphone.
* ``POST /api/sessions/{id}/speech`` with an audio file as the body (any type PyAV decodes) or JSON
  ``{"text": ...}`` -> ``{utterance, duration_s}``; queued behind the utterances not yet spoken.
* ``GET /api/sessions/{id}/stats`` -> the session's fps, latency and drift figures (:meth:`Session.stats`).
* ``DELETE /api/sessions/{id}`` -> ``{closed: id}``.

Every refusal is ``{"error": "one sentence"}`` with a status: 400 malformed request, 404 unknown avatar or
session, 413 upload or text too large, 415 not audio, 422 audio too long / too low a rate / silent,
503 ``--max-sessions`` reached or TTS unavailable. A client that vanishes is noticed by ICE consent
checks (every ``consent_interval`` s, ``consent_failures`` misses: ~4 s instead of aioice's 30 s); its
session then ends: its thread stops, its renderer and mic processes exit (their memory goes back to the
system) and its tensors are dropped. A session whose connection never completes is closed after
``connect_timeout`` s.

Processes: the server's own (event loop, WebRTC, VP8/Opus, the sessions' producer threads); a zygote forked
when the :class:`Server` is made, before it starts any thread, holding the loaded avatars (:mod:`.forked`);
per session, a renderer process forked from it (and one for the mic's live features), sharing the avatars'
pages copy-on-write; ``start_workers`` spawned feature workers for uploads and typed text (offline-equal rows,
Whisper loaded in each). On a GPU, or without fork, sessions render in threads of the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from talkinghead.media import AUDIO_RATE
from talkinghead.methods.streaming import DrivenAvatar

from .session import Session, audio_frame, video_frame
from .speech import SpeechError, TextToSpeech, UploadLimits, decode_upload

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("talkinghead.serve")


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


def _track_classes():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class AvatarVideo(MediaStreamTrack):
        kind = "video"

        def __init__(self, session: Session):
            super().__init__()
            self.session = session

        async def recv(self):
            if self.readyState != "live" or self.session.closed:
                raise MediaStreamError
            pts, image = await self.session.next_video()
            return video_frame(pts, image)

    class AvatarAudio(MediaStreamTrack):
        kind = "audio"

        def __init__(self, session: Session):
            super().__init__()
            self.session = session
            self.state: dict = {}

        async def recv(self):
            if self.readyState != "live" or self.session.closed:
                raise MediaStreamError
            pts, samples = await self.session.next_audio(self.state)
            return audio_frame(pts, samples)

    return AvatarVideo, AvatarAudio


def start_feature_workers(count: int, whispers: tuple = ()):
    """A pool of ``count`` spawned processes with the extractors imported, a decoder built and the Whisper
    encoders of ``whispers`` loaded in each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from talkinghead.audio.extractor import warm_up

    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
    for f in [pool.submit(warm_up, whispers) for _ in range(count)]:
        f.result()
    return pool


class Server:
    """Avatars loaded once, shared by every session; at most ``max_sessions`` sessions at a time."""

    def __init__(self, avatars: list[DrivenAvatar], max_sessions: int = 4, limits: UploadLimits = UploadLimits(),
                 consent_interval: float = 1.0, consent_failures: int = 4, connect_timeout: float = 30.0,
                 session_options: dict | None = None, processes: bool | None = None):
        """``processes``: each session's renderer and mic features in processes of their own, forked from a
        zygote made here (:mod:`.forked`; None: wherever that works, i.e. fork and CPU avatars). Create the
        server before starting threads of your own (``talkinghead serve`` does)."""
        import aioice.ice

        from .forked import Zygote, can_fork

        # aioice reads these module constants in its consent loop: a vanished client is found in seconds.
        aioice.ice.CONSENT_INTERVAL = consent_interval
        aioice.ice.CONSENT_FAILURES = consent_failures
        self.avatars = {a.name: a for a in avatars}
        if processes is None:
            processes = can_fork([a.device for a in avatars])
        self.zygote = Zygote(self.avatars) if processes else None  # first: before this server starts any thread
        self.max_sessions = max_sessions
        self.limits = limits
        self.tts = TextToSpeech()
        self.connect_timeout = connect_timeout
        self.session_options = session_options or {}
        self.sessions: dict[str, Session] = {}
        self.pcs: dict[str, object] = {}
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="serve-work")
        self.closed_sessions = 0
        self.workers = None  # feature worker processes, started by start_workers()
        self._own_workers = False

    def start_workers(self, count: int = 2, pool=None) -> None:
        """Feature extraction in ``count`` worker processes (pocketsphinx holds the GIL while decoding: in this
        process it would stall the media clock and every session's renderer); ``pool``: use this one."""
        whispers = tuple({a.extract.whisper for a in self.avatars.values() if a.extract.whisper is not None})
        self.workers = pool if pool is not None else start_feature_workers(count, whispers)
        self._own_workers = pool is None

    # ------------------------------------------------------------------------------ app

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.limits.max_bytes * 2 + 1024 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/avatars", self.list_avatars)
        app.router.add_post("/api/sessions", self.create_session)
        app.router.add_post("/api/sessions/{id}/speech", self.speech)
        app.router.add_get("/api/sessions/{id}/stats", self.stats)
        app.router.add_delete("/api/sessions/{id}", self.delete_session)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app) -> None:
        for sid in list(self.sessions):
            await self._close(sid, "server shutdown")
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.workers is not None and self._own_workers:
            self.workers.shutdown(wait=False, cancel_futures=True)
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None

    async def index(self, request):
        from aiohttp import web

        return web.FileResponse(STATIC / "index.html")

    async def list_avatars(self, request):
        from aiohttp import web

        return web.json_response([{"name": a.name, "method": a.method, "fps": a.fps, "size": a.size,
                                   "lookahead_frames": a.open_stream().lookahead} for a in self.avatars.values()])

    # ------------------------------------------------------------------------------ sessions

    def _session(self, request) -> Session | None:
        return self.sessions.get(request.match_info["id"])

    async def create_session(self, request):
        from aiohttp import web
        from aiortc import RTCPeerConnection, RTCSessionDescription

        try:
            body = await request.json()
            name, sdp, kind = body["avatar"], body["sdp"], body.get("type", "offer")
            if not isinstance(sdp, str) or kind != "offer":
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _error(400, 'send JSON {"avatar": NAME, "sdp": OFFER_SDP, "type": "offer"}')
        if name not in self.avatars:
            return _error(404, f"no avatar {name!r} (this server has: {', '.join(sorted(self.avatars))})")
        if len(self.sessions) >= self.max_sessions:
            return _error(503, f"the server is full ({self.max_sessions} sessions, --max-sessions); try again later")
        avatar = self.avatars[name]
        loop = asyncio.get_running_loop()
        try:  # forks its renderer process: off the event loop
            session = await loop.run_in_executor(self.pool, lambda: Session(
                avatar, feature_pool=self.workers, zygote=self.zygote, **self.session_options))
        except Exception as exc:
            log.exception("cannot start a session of %s", name)
            return _error(503, f"cannot start a renderer for {name!r} ({type(exc).__name__}: {exc})")
        if len(self.sessions) >= self.max_sessions:  # filled up meanwhile
            session.close()
            return _error(503, f"the server is full ({self.max_sessions} sessions, --max-sessions); try again later")
        pc = RTCPeerConnection()
        self.sessions[session.id] = session
        self.pcs[session.id] = pc
        session.on_close.append(lambda s: loop.create_task(self._close(s.id, "its renderer stopped")))
        video_cls, audio_cls = _track_classes()

        @pc.on("connectionstatechange")
        async def _state():
            if pc.connectionState in ("failed", "closed"):
                await self._close(session.id, f"connection {pc.connectionState}")

        @pc.on("track")
        def _track(track):
            if track.kind == "audio":
                loop.create_task(self._read_mic(session, track))

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(video_cls(session))
            pc.addTrack(audio_cls(session))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as exc:  # a malformed offer
            await self._close(session.id, "bad offer")
            return _error(400, f"cannot negotiate WebRTC with this offer ({type(exc).__name__}: {exc})")
        session.start(loop)
        sid = session.id  # the timer must not hold the session itself (a vanished one would live 30 s on)
        loop.call_later(self.connect_timeout, lambda: loop.create_task(self._connect_deadline(sid)))
        return web.json_response({"session": session.id, "sdp": pc.localDescription.sdp,
                                  "type": pc.localDescription.type})

    async def _connect_deadline(self, sid: str) -> None:
        pc = self.pcs.get(sid)
        if pc is not None and pc.connectionState != "connected":
            await self._close(sid, f"not connected after {self.connect_timeout:g} s")

    async def _read_mic(self, session: Session, track) -> None:
        """The client's microphone: resampled to 16 kHz mono, fed in ~40 ms chunks in arrival order."""
        import av
        from aiortc.mediastreams import MediaStreamError

        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        worker = ThreadPoolExecutor(1, thread_name_prefix=f"mic-{session.id}")  # keeps chunks in order
        loop = asyncio.get_running_loop()
        pending: list[tuple[np.ndarray, float]] = []  # (samples, arrival) not yet handed to the session
        inflight = None
        try:
            while not session.closed:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    break
                arrival = time.monotonic()
                for out in resampler.resample(frame):
                    pending.append((out.to_ndarray().reshape(-1).astype(np.float32), arrival))
                # one call in flight at a time, handed everything that came meanwhile: bounded backlog
                if (inflight is None or inflight.done()) and sum(p.size for p, _ in pending) >= 0.04 * AUDIO_RATE:
                    inflight, pending = loop.run_in_executor(worker, session.mic_chunk, pending), []
        finally:
            if not session.closed:
                await loop.run_in_executor(worker, session.mic_ended)
            worker.shutdown(wait=False)

    async def _close(self, sid: str, why: str = "closed") -> None:
        session = self.sessions.pop(sid, None)
        pc = self.pcs.pop(sid, None)
        if session is not None:
            level = logging.INFO if why in ("DELETE", "connection closed", "server shutdown") else logging.WARNING
            log.log(level, "session %s ends: %s%s", sid, why, f" ({session.error})" if session.error else "")
            self.closed_sessions += 1
            await asyncio.get_running_loop().run_in_executor(None, session.close)
        if pc is not None:
            await pc.close()
            pc.remove_all_listeners()  # its handlers' closures hold the session: let both be collected

    async def delete_session(self, request):
        from aiohttp import web

        sid = request.match_info["id"]
        if sid not in self.sessions:
            return _error(404, f"no session {sid!r}")
        await self._close(sid, "DELETE")
        return web.json_response({"closed": sid})

    async def stats(self, request):
        from aiohttp import web

        session = self._session(request)
        if session is None:
            return _error(404, f"no session {request.match_info['id']!r}")
        return web.json_response(session.stats())

    # ------------------------------------------------------------------------------ speech

    async def _read_body(self, request) -> bytes | None:
        """The body, or None when it is over the upload limit (read no further than that)."""
        if request.content_length is not None and request.content_length > self.limits.max_bytes:
            return None
        data = bytearray()
        while True:
            chunk = await request.content.read(1 << 16)
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > self.limits.max_bytes:
                return None

    async def speech(self, request):
        from aiohttp import web

        session = self._session(request)
        if session is None:
            return _error(404, f"no session {request.match_info['id']!r}")
        received = time.monotonic()
        loop = asyncio.get_running_loop()
        data = await self._read_body(request)
        if data is None:
            return _error(413, f"the upload is larger than {self.limits.max_bytes / 2**20:.0f} MB")
        try:
            if request.content_type == "application/json":
                try:
                    text = json.loads(data.decode("utf-8"))["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    return _error(400, 'send JSON {"text": "what to say"} or an audio file as the body')
                wave = await loop.run_in_executor(self.pool, self.tts.synthesize, text)
            elif request.content_type.startswith("multipart/"):
                return _error(415, "send the audio file itself as the request body, not a multipart form")
            else:
                wave = await loop.run_in_executor(self.pool, decode_upload, data, self.limits)
        except SpeechError as exc:
            return _error(exc.status, str(exc))
        if session.closed:
            return _error(404, f"session {session.id!r} ended")
        u = await loop.run_in_executor(self.pool, session.say, wave, received, self.pool)
        return web.json_response({"utterance": u.id, "duration_s": round(len(wave) / AUDIO_RATE, 3)})


def run(avatars: list[Path], host: str, port: int, max_sessions: int, limits: UploadLimits = UploadLimits()) -> None:
    """Load every avatar once, then serve until interrupted."""
    from aiohttp import web
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no tqdm monitor thread: the zygote is forked from a single-threaded process
    loaded = [DrivenAvatar(p) for p in tqdm(avatars, desc="loading avatars", unit="avatar")]
    names = [a.name for a in loaded]
    if len(set(names)) != len(names):
        from talkinghead.errors import UserError

        raise UserError(f"two avatars share a folder name ({', '.join(names)}); the page lists them by name")
    if threading.active_count() > 1:  # a thread started by a library while loading: forking is less safe
        log.warning("forking the zygote beside %d other thread(s): %s", threading.active_count() - 1,
                    ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread()))
    server = Server(loaded, max_sessions=max_sessions, limits=limits)
    server.start_workers()
    server.tts.warm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(f"talkinghead serve: http://{host}:{port}/  ({len(loaded)} avatar(s), up to {max_sessions} sessions)",
          flush=True)
    web.run_app(server.app(), host=host, port=port, print=None)

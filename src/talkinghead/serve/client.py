"""A Python client of the server's API (aiortc + aiohttp), used by the tests and ``bench/bench_serve.py``.

It connects like the page does, records every received video frame (pts, arrival time, RGB image) and
audio frame (pts, samples), and can play a wave into the session as its microphone, paced in real time
in 20 ms frames.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np


def _mic_track_class():
    from aiortc import MediaStreamTrack

    class WaveMic(MediaStreamTrack):
        """A microphone that says ``wave`` (16 kHz float) once, then stays silent; 20 ms frames at 48 kHz."""

        kind = "audio"

        def __init__(self, wave: np.ndarray, lead_s: float = 0.0):
            super().__init__()
            from scipy.signal import resample_poly

            wave16 = np.concatenate([np.zeros(int(lead_s * 16000)), np.asarray(wave, np.float64)])
            self.wave48 = resample_poly(wave16, 3, 1).astype(np.float32)
            self.k = 0
            self.t0: float | None = None
            self.sent_at: list[float] = []  # wall time each 20 ms frame was handed over

        async def recv(self):
            import av

            if self.t0 is None:
                self.t0 = time.monotonic()
            due = self.t0 + self.k * 0.02
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            chunk = self.wave48[self.k * 960:(self.k + 1) * 960]
            chunk = np.pad(chunk, (0, 960 - chunk.size))
            frame = av.AudioFrame(format="s16", layout="mono", samples=960)
            frame.planes[0].update((np.clip(chunk, -1, 1) * 32767).astype(np.int16).tobytes())
            frame.sample_rate, frame.pts, frame.time_base = 48000, self.k * 960, Fraction(1, 48000)
            self.sent_at.append(time.monotonic())
            self.k += 1
            return frame

    return WaveMic


@dataclass
class Received:
    video: list = field(default_factory=list)  # (pts 90 kHz, monotonic arrival, uint8 [H, W, 3])
    audio: list = field(default_factory=list)  # (pts at the frame's rate, sample rate, float32 [S] mono)


class Client:
    """One session against ``base`` (e.g. ``http://127.0.0.1:8000``)."""

    def __init__(self, base: str, keep_images: bool = True):
        self.base = base.rstrip("/")
        self.keep_images = keep_images
        self.pc = None
        self.http = None
        self.session: str | None = None
        self.received = Received()
        self.tasks: list[asyncio.Task] = []
        self.mic = None

    async def _json(self, method: str, path: str, **kw) -> tuple[int, dict]:
        import aiohttp

        if self.http is None:
            self.http = aiohttp.ClientSession()
        async with self.http.request(method, self.base + path, **kw) as r:
            return r.status, await r.json()

    async def avatars(self) -> list[dict]:
        return (await self._json("GET", "/api/avatars"))[1]

    async def connect(self, avatar: str, mic_wave: np.ndarray | None = None, mic_lead_s: float = 0.0) -> tuple[int, dict]:
        """Offer, answer, start recording. Returns (HTTP status, JSON answer)."""
        from aiortc import RTCPeerConnection, RTCSessionDescription

        self.pc = pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        if mic_wave is not None:
            self.mic = _mic_track_class()(mic_wave, mic_lead_s)
            pc.addTrack(self.mic)
        else:
            pc.addTransceiver("audio", direction="recvonly")

        @pc.on("track")
        def _track(track):
            self.tasks.append(asyncio.get_running_loop().create_task(self._record(track)))

        await pc.setLocalDescription(await pc.createOffer())
        status, body = await self._json("POST", "/api/sessions", json={
            "avatar": avatar, "sdp": pc.localDescription.sdp, "type": pc.localDescription.type})
        if status != 200:
            await pc.close()
            self.pc = None
            return status, body
        self.session = body["session"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        return status, body

    async def _record(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if track.kind == "video":
                img = frame.to_ndarray(format="rgb24") if self.keep_images else None
                self.received.video.append((frame.pts, now, img))
            else:
                a = frame.to_ndarray().astype(np.float32)
                if a.ndim == 2 and a.shape[0] == 1 and len(frame.layout.channels) > 1:  # packed stereo
                    a = a.reshape(-1, len(frame.layout.channels)).mean(1)
                self.received.audio.append((frame.pts, frame.sample_rate, a.reshape(-1) / 32768.0))

    async def speak(self, data: bytes, content_type: str = "audio/wav") -> tuple[int, dict]:
        return await self._json("POST", f"/api/sessions/{self.session}/speech", data=data,
                                headers={"Content-Type": content_type})

    async def say(self, text: str) -> tuple[int, dict]:
        return await self._json("POST", f"/api/sessions/{self.session}/speech", json={"text": text})

    async def stats(self) -> tuple[int, dict]:
        return await self._json("GET", f"/api/sessions/{self.session}/stats")

    async def wait_frames(self, count: int, timeout: float = 30.0) -> int:
        end = time.monotonic() + timeout
        while len(self.received.video) < count and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return len(self.received.video)

    async def vanish(self) -> None:
        """Drop the connection without saying goodbye (no DELETE, no RTCP BYE): a client that disappears."""
        for t in self.tasks:
            t.cancel()
        if self.pc is not None:
            # stop our ICE agent answering consent checks: the server sees silence, as from a dead peer
            for transceiver in self.pc.getTransceivers():
                transport = transceiver.sender.transport
                if transport is not None:
                    await transport.transport.stop()
        if self.http is not None:
            await self.http.close()
            self.http = None

    async def close(self, delete: bool = True) -> None:
        if delete and self.session is not None:
            try:
                await self._json("DELETE", f"/api/sessions/{self.session}")
            except Exception:
                pass
        for t in self.tasks:
            t.cancel()
        if self.pc is not None:
            await self.pc.close()
        if self.http is not None:
            await self.http.close()
        self.http = None


class ServerThread:
    """A :class:`~talkinghead.serve.app.Server` on its own event loop in a thread, on loopback (tests, benches).

    ``base`` is its URL once :meth:`start` returned; :meth:`call` runs a coroutine on the server's loop."""

    def __init__(self, server, host: str = "127.0.0.1", port: int = 0):
        import threading

        self.server, self.host, self.port = server, host, port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serve-loop", daemon=True)
        self.runner = None
        self.base = ""

    def start(self) -> "ServerThread":
        from aiohttp import web

        async def up():
            self.runner = web.AppRunner(self.server.app())
            await self.runner.setup()
            site = web.TCPSite(self.runner, self.host, self.port)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(60)
        self.base = f"http://{self.host}:{port}"
        return self

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup())

        async def drain():  # let the sessions' closing tasks finish before the loop stops
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            await asyncio.wait(others, timeout=5) if others else None

        self.call(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

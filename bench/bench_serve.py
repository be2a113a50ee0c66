"""``talkinghead serve`` measured: features, render throughput, concurrent sessions, latency, A/V drift, landmark
sync of the received stream against the offline render, faults, and a real-browser screenshot.

    python bench/bench_serve.py --avatar GFT_AVATAR --avatar GT_AVATAR --out DIR [--seconds 20] [--max-sessions 3]

Everything runs over loopback WebRTC (aiortc client, talkinghead.serve.client) against the real server, except
the 10-minute drift run, which drives a Session on a virtual clock (no waiting, a stub renderer that writes the
frame index into the image) because ten real minutes do not fit. Writes DIR/bench_serve.json, DIR/page.png,
and an entry under "## talkinghead serve" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import sys
import time
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchlib import append_entry, stamp  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPEECH = SHARED / "speech_en_imagine_6s.wav"
LONG_SPEECH = SHARED / "speech_en_60s.wav"


def wav_bytes(wave: np.ndarray, rate: int = 16000) -> bytes:
    import soundfile

    b = io.BytesIO()
    soundfile.write(b, wave, rate, format="WAV", subtype="PCM_16")
    return b.getvalue()


# ------------------------------------------------------------------------------------------ A. features


def bench_features(seconds: float) -> dict:
    from talkinghead.audio.extractor import DatasetExtractor
    from talkinghead.media import read_audio
    from talkinghead.methods.render import driving_features
    from talkinghead.methods.streaming import FeatureStream, utterance_features

    wave = read_audio(LONG_SPEECH)[: int(seconds * 16000)]
    fps = 25.0
    t = time.perf_counter()
    off = utterance_features(wave, fps, DatasetExtractor())
    offline_s = time.perf_counter() - t
    exact = float(np.abs(off - driving_features(wave, fps)).max())
    out = {"audio_s": seconds, "utterance_equals_offline_max_abs": exact, "offline_extract_s": round(offline_s, 2)}
    for la, hop, ctx in ((3, 5, 20), (2, 2, 12)):
        fs = FeatureStream(fps, DatasetExtractor(keep_decoder=True), la, hop, ctx)
        rows = []
        for i in range(0, len(wave), 640):  # 40 ms chunks
            r = fs.push(wave[i:i + 640])
            if r.size:
                rows.append(r)
        r = fs.flush()
        if r.size:
            rows.append(r)
        live = np.concatenate(rows)
        mel = np.abs(live[:, 40:120] - off[:, 40:120]).mean(1)
        spans = {"0-1s": (0, 25), "1-2s": (25, 50), "2-5s": (50, 125), "5s-end": (125, len(mel))}
        out[f"live_la{la}_hop{hop}_ctx{ctx}"] = {
            "rows": [int(live.shape[0]), int(off.shape[0])],
            "mel_mae_by_time": {k: round(float(mel[a:b].mean()), 3) for k, (a, b) in spans.items()},
            "energy_mae_after_2s": round(float(np.abs(live[50:, 120] - off[50:, 120]).mean()), 3),
            "phone_posterior_tv": round(float(np.abs(live[:, :40] - off[:, :40]).sum(1).mean() / 2), 3),
            "phone_argmax_agreement": round(float((live[:, :40].argmax(1) == off[:, :40].argmax(1)).mean()), 3),
            "extract_s_per_audio_s": round(fs.compute_s / seconds, 2),
            "row_latency_frames": [la, la + hop - 1],
        }
    return out


def bench_whisper_stream(seconds: float) -> dict:
    """Live Whisper rows (talkinghead.audio.whisper_stream) vs the offline ones on ``seconds`` of speech_en_60s
    (40 ms chunks): hidden state 2 (the default) per look-ahead and hop, by window (cores of 22 s), the row
    delay the look-ahead costs, CPU per audio second; and the whole live row (+ relative energy) at the
    serve defaults (WHISPER_LIVE) against the offline driving features."""
    from talkinghead.audio.extractor import DatasetExtractor
    from talkinghead.audio.whisper import WhisperChoice, shared_whisper, whisper_features
    from talkinghead.audio.whisper_stream import LiveWhisperFeatures, WhisperStream
    from talkinghead.media import read_audio
    from talkinghead.methods.streaming import WHISPER_LIVE, num_frames_of

    fps = 25.0
    t = time.process_time()
    enc = shared_whisper()
    load_s = time.process_time() - t
    t = time.process_time()
    assert shared_whisper() is enc
    again_s = time.process_time() - t
    wave = read_audio(LONG_SPEECH)[: int(seconds * 16000)]
    n = num_frames_of(len(wave), fps)
    t = time.process_time()
    off = whisper_features(enc, wave, fps, n).astype(np.float32)[:, 2]  # [T, D]
    offline_s = time.process_time() - t

    def feed(stream):
        rows = [stream.push(wave[i:i + 640]) for i in range(0, len(wave), 640)]
        return np.concatenate(rows + [stream.flush()])

    def compare(live, ref):
        d = np.linalg.norm(live - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-6)
        a, b = live - live.mean(0), ref - ref.mean(0)
        corr = float((a * b).sum() / np.sqrt((a ** 2).sum() * (b ** 2).sum()))
        return d, round(corr, 4)

    out = {"encoder": enc.name, "audio_s": seconds, "load_cpu_s": round(load_s, 2), "shared_again_cpu_s": round(again_s, 4),
           "offline_cpu_s_per_audio_s": round(offline_s / seconds, 3), "sweep_state2": []}
    cores = [(a, min(a + 22.0, seconds)) for a in np.arange(0.0, seconds, 22.0)]
    for la, hop in ((0, 2), (2, 2), (5, 2), (12, 2), (5, 5)):
        ws = WhisperStream(enc, (2,), fps, la, hop)
        live = feed(ws)[:, 0]
        d, corr = compare(live, off)
        by_core = {f"{a:g}-{b:g}s": round(float(np.median(d[int(a * fps): int(b * fps)])), 4) for a, b in cores if b > a}
        out["sweep_state2"].append({"lookahead": la, "hop": hop, "row_delay_frames": ws.delay_frames,
                                    "row_delay_ms": round(ws.delay_frames / fps * 1000), "rel_err_median": round(float(np.median(d)), 4),
                                    "rel_err_p95": round(float(np.percentile(d, 95)), 4), "centred_corr": corr,
                                    "rel_err_median_by_core": by_core, "cpu_s_per_audio_s": round(ws.compute_s / seconds, 3)})
        print("whisper stream", out["sweep_state2"][-1], flush=True)
    # the serve default, the whole row as an avatar reads it, vs the offline driving features
    t = time.process_time()
    offline_rows = DatasetExtractor(whisper=WhisperChoice())(wave, fps, n).stack()
    rows_s = time.process_time() - t
    lf = LiveWhisperFeatures(enc, (2,), fps, **WHISPER_LIVE)
    live = feed(lf)
    d, corr = compare(live[:, :-1], offline_rows[:, :-1])
    e = np.abs(live[:, -1] - offline_rows[:, -1])
    out["serve_default"] = {**WHISPER_LIVE, "row_delay_ms": round(lf.delay_frames / fps * 1000),
                            "state2_rel_err_median": round(float(np.median(d)), 4), "state2_centred_corr": corr,
                            "energy_column_mae_after_2s": round(float(e[50:].mean()), 4),
                            "energy_column_max_after_2s": round(float(e[50:].max()), 4),
                            "cpu_s_per_audio_s": round(lf.compute_s / seconds, 3),
                            "offline_rows_cpu_s_per_audio_s (every whisper state)": round(rows_s / seconds, 3)}
    return out


def bench_utterance() -> dict:
    """An upload's features as the server computes them (part by part, the encoder only as deep as the avatar
    reads: talkinghead.methods.streaming.utterance_rows) against the offline extractor (what render runs), on
    the 5.6 s WAV and on 60 s: CPU seconds before the first frame can go out, in all, and equality."""
    from talkinghead.audio.extractor import DatasetExtractor
    from talkinghead.audio.whisper import WhisperChoice, shared_whisper
    from talkinghead.media import read_audio
    from talkinghead.methods.streaming import utterance_features, utterance_parts, utterance_rows

    shared_whisper()
    extract = DatasetExtractor(whisper=WhisperChoice())
    out = {}
    for name, wave in (("speech_en_imagine_6s", read_audio(SPEECH)), ("speech_en_60s", read_audio(LONG_SPEECH)[: 60 * 16000])):
        t = time.process_time()
        off = utterance_features(wave, 25.0, extract)
        off_s = time.process_time() - t
        parts, got, cpu = utterance_parts(wave, 25.0, extract), [], []
        for k in range(len(parts)):
            t = time.process_time()
            got.append(utterance_rows(wave, 25.0, extract, k))
            cpu.append(time.process_time() - t)
        out[name] = {"audio_s": round(len(wave) / 16000, 3), "parts": len(parts),
                     "offline_extract_cpu_s": round(off_s, 3), "first_part_cpu_s": round(cpu[0], 3),
                     "all_parts_cpu_s": round(sum(cpu), 3),
                     "max_abs_diff_vs_offline": float(np.abs(np.concatenate(got) - off).max())}
    return out


# ------------------------------------------------------------------------------------------ B. render only


def bench_render(avatars: list) -> dict:
    import torch

    out = {}
    for av in avatars:
        stream = av.open_stream()
        rows = np.repeat(av.silence[None], 200, 0)
        ms = []
        with torch.no_grad():
            for j in range(200):
                t = time.perf_counter()
                stream.render(av.condition(j, rows, j))
                ms.append((time.perf_counter() - t) * 1000)
        ms = np.asarray(ms[10:])
        out[av.name] = {"method": av.method, "size": av.size, "fps": round(1000 / ms.mean(), 1),
                        "ms_p50": round(float(np.percentile(ms, 50)), 1), "ms_p95": round(float(np.percentile(ms, 95)), 1)}
    return out


def bench_render_processes(server, avatars: list, counts=(1, 2), frames: int = 150) -> dict:
    """Renderers in forked processes (as sessions get them), ``k`` at once, each rendering ``frames`` frames as
    fast as it can (no WebRTC, no clock): frames per second per renderer and together, and each one's memory."""
    from concurrent.futures import ThreadPoolExecutor

    from talkinghead.serve.forked import process_memory_mb
    from talkinghead.serve.session import ForkedRenderer

    if server.zygote is None:
        return {"skipped": "the server renders in threads (no fork, or a GPU)"}
    out = {}
    for av in avatars:
        rows = np.repeat(av.silence[None], frames, 0)
        runs = []
        for k in counts:
            rs = [ForkedRenderer(server.zygote, av) for _ in range(k)]

            def run(r):
                for j in range(10):  # warm
                    r.render(j, rows, j)
                t = time.perf_counter()
                for j in range(frames):
                    r.render(j, rows, j)
                return frames / (time.perf_counter() - t)

            with ThreadPoolExecutor(k) as ex:
                fps = list(ex.map(run, rs))
            mem = [process_memory_mb(r.pid) for r in rs]
            for r in rs:
                r.close()
            runs.append({"processes": k, "fps_each": [round(f, 1) for f in fps], "fps_total": round(sum(fps), 1),
                         "memory_mb_each": mem})
        out[av.name] = runs
    return out


# ------------------------------------------------------------------------------------------ C. live sessions


async def _sessions(base: str, server, avatar: str, k: int, seconds: float, speech: np.ndarray) -> dict:
    """k clients at once; each uploads the 5.6 s WAV twice, at t = 0 and t = seconds / 2 (> 5.6 s: the second
    upload does not queue behind the first), so first_frames_ms holds two first frames after an upload."""
    from talkinghead.serve.client import Client

    clients = [Client(base, keep_images=False) for _ in range(k)]
    for c in clients:
        status, body = await c.connect(avatar)
        assert status == 200, body
    for c in clients:
        await c.wait_frames(5, 60)
    await asyncio.sleep(1.0)
    first = [(await c.stats())[1] for c in clients]
    t0 = time.monotonic()
    for c in clients:  # everybody speaks at once, then again halfway
        await c.speak(wav_bytes(speech))
    await asyncio.sleep(seconds / 2)
    for c in clients:
        await c.speak(wav_bytes(speech))
    await asyncio.sleep(seconds / 2)
    wall = time.monotonic() - t0
    last = [(await c.stats())[1] for c in clients]
    firsts = [list(server.sessions[c.session].first_frame_ms) for c in clients]
    procs = [_session_processes(server.sessions[c.session]) for c in clients]
    recv = [len(c.received.video) for c in clients]
    for c in clients:
        await c.close()
    per = []
    for a, b, n, ff, pr in zip(first, last, recv, firsts, procs):
        sent = b["frames_sent"] - a["frames_sent"]
        rendered = b["frames_rendered"] - a["frames_rendered"]
        per.append({"sent_fps": round(sent / wall, 1), "rendered_fps": round(rendered / wall, 1),
                    "dropped_share": round(1 - rendered / max(sent, 1), 3), "received_frames": n,
                    "first_frames_ms": ff, "render_ms": b["render_ms"], "send_skew_ms": b["send_skew_ms"],
                    "clock_rebases": b["clock_rebases"] - a["clock_rebases"], "processes": pr})
    held = all(p["dropped_share"] < 0.05 and p["sent_fps"] >= 24 for p in per)
    return {"sessions": k, "held_25fps": held, "per_session": per, "server_memory_mb": _server_memory(server)}


def _session_processes(session) -> dict:
    """The session's own processes (renderer, mic features): memory (MiB: rss, pss, private = what its end
    frees) and CPU seconds so far; {} when it renders in the server's process."""
    from talkinghead.serve.forked import process_memory_mb

    out = {}
    live = session.live.features if session.live is not None else None
    for name, obj in (("renderer", session.renderer), ("mic_features", live)):
        pid = getattr(obj, "pid", None)
        if pid is not None:
            out[name] = {"memory_mb": process_memory_mb(pid), "cpu_s": _proc_cpu_s([pid])}
    return out


def _server_memory(server) -> dict:
    import os

    from talkinghead.serve.forked import process_memory_mb

    out = {"main": process_memory_mb(os.getpid())}
    if server.zygote is not None:
        out["zygote"] = process_memory_mb(server.zygote.pid)
    return out


async def _mic_latency(base: str, server, avatar: str, speech: np.ndarray) -> dict:
    from talkinghead.serve.client import Client

    c = Client(base, keep_images=False)
    await c.connect(avatar, mic_wave=speech, mic_lead_s=0.5)
    await asyncio.sleep(len(speech) / 16000 + 3.0)
    stats = (await c.stats())[1]
    procs = _session_processes(server.sessions[c.session])
    await c.close()
    return {"latency_ms": stats["latency_ms"], "render_ms": stats["render_ms"], "frames_dropped": stats["frames_dropped"],
            "frames_sent": stats["frames_sent"], "repeated_share": round(stats["frames_dropped"] / max(1, stats["frames_sent"]), 3),
            "mic_rows_late": stats["mic_rows_late"], "frames_by_source": stats["frames_by_source"],
            "mic_frames_repeated_share": round(stats["frames_by_source"]["mic"]["repeated"]
                                               / max(1, stats["frames_by_source"]["mic"]["frames"]), 3),
            "send_skew_ms": stats["send_skew_ms"], "processes": procs}


async def _typed_text(base: str, server, avatar: str) -> dict:
    """First frame after typed text (Piper synthesis + features), after one warm-up sentence that loads the voice."""
    from talkinghead.serve.client import Client

    c = Client(base, keep_images=False)
    await c.connect(avatar)
    await c.wait_frames(5, 60)
    status, warm = await c.say("Hello.")
    assert status == 200, warm
    await asyncio.sleep(warm["duration_s"] + 2.0)
    text = "Hello, I am the avatar of this server, and I say what you type."
    t = time.monotonic()
    status, body = await c.say(text)
    answer_s = time.monotonic() - t
    assert status == 200, body
    await asyncio.sleep(body["duration_s"] + 1.5)
    firsts = list(server.sessions[c.session].first_frame_ms)
    await c.close()
    return {"text": text, "duration_s": body["duration_s"], "http_answer_ms": round(answer_s * 1000, 1),
            "first_frame_ms": firsts[-1], "warm_up_first_frame_ms": firsts[0]}


async def _faults(base: str, server, avatar: str, speech: np.ndarray) -> dict:
    from talkinghead.serve.client import Client

    out = {}
    bystander = Client(base, keep_images=False)
    await bystander.connect(avatar)
    victim = Client(base, keep_images=False)
    await victim.connect(avatar)
    await bystander.wait_frames(5, 60)
    await victim.wait_frames(5, 60)
    for name, data, ctype in [("oversized upload", b"\0" * (server.limits.max_bytes + 1), "audio/wav"),
                              ("non-audio file", b"%PDF-1.4 not audio " * 100, "application/pdf"),
                              ("silent audio", wav_bytes(np.zeros(16000, np.float32)), "audio/wav")]:
        out[name] = list(await victim.speak(data, ctype))
    extra, answers = [], []
    while len(extra) <= server.max_sessions:  # fill the server, then one more
        e = Client(base, keep_images=False)
        status, body = await e.connect(avatar)
        extra.append(e)
        answers.append(status)
        if status != 200:
            out["more sessions than --max-sessions"] = [status, body]
            break
    n = len(bystander.received.video)
    await asyncio.sleep(1.0)
    out["bystander_frames_in_1s_after_the_refusals"] = len(bystander.received.video) - n
    for e, a in zip(extra, answers):
        await e.close(delete=a == 200)
    # the victim vanishes in the middle of an utterance
    await victim.speak(wav_bytes(speech))
    await asyncio.sleep(1.0)
    ref = weakref.ref(server.sessions[victim.session])
    t = time.monotonic()
    await victim.vanish()
    while victim.session in server.sessions and time.monotonic() - t < 60:
        await asyncio.sleep(0.2)
    gone = time.monotonic() - t
    n = len(bystander.received.video)
    await asyncio.sleep(3.0)  # aiortc's sender tasks wind down
    gc.collect()
    out["client vanishes mid-utterance"] = {"session_ended_after_s": round(gone, 1),
                                            "session_object_freed": ref() is None,
                                            "bystander_frames_in_next_3s": len(bystander.received.video) - n}
    await bystander.close()
    out["sessions_left"] = len(server.sessions)
    return out


# ------------------------------------------------------------------------------------------ D. drift (virtual clock)


class _StubStream:
    lookahead = 0

    def render(self, cond):
        import torch

        img = torch.zeros(8, 8, 3)
        img[..., 0] = (cond.index % 256) / 255.0  # the utterance frame, carried by the image
        img[..., 1] = (cond.index // 256 % 256) / 255.0
        return img

    def reset(self):
        pass


class _StubAvatar:
    """Just enough of DrivenAvatar for Session: the frame index of the utterance row is written into the image."""

    name, method, fps, radius, size = "stub", "stub", 25.0, 0, 8

    def __init__(self):
        self.silence = np.full(1, -1.0, np.float32)

    def open_stream(self):
        return _StubStream()

    def condition(self, row, rows, n):
        from types import SimpleNamespace

        return SimpleNamespace(index=int(row) if rows.shape[0] > 1 else 0)

    @staticmethod
    def extract(wave, fps, num_frames):
        from talkinghead.audio.features import AudioFeatures

        T = num_frames
        return AudioFeatures(fps=fps, mel=np.zeros((T, 1), np.float32), energy=np.zeros(T, np.float32),
                             phone_ids=np.zeros(T, np.int64), phone_posteriors=np.full((T, 40), 1 / 40, np.float32))



async def _drift(minutes: float) -> dict:
    """10 minutes of one utterance whose samples are a ramp (sample index mod 32768): for every video frame,
    find where in the sent audio the first sample of its own audio went out, and compare the timestamps."""
    from talkinghead.serve.session import AUDIO_FRAME, VIDEO_CLOCK, Session, frame_samples

    av = _StubAvatar()
    s = Session(av, realtime=False, extract=av.extract)
    period = 32768
    total = int(minutes * 60 * 16000)
    ramp = ((np.arange(total) % period) / period * 1.8 - 0.9).astype(np.float32)
    s.start(asyncio.get_running_loop())
    u = s.say(ramp, time.monotonic())
    T = len(u.rows)
    video, audio = [], {}
    state: dict = {}

    async def pull_audio():
        while True:
            pts, samples = await s.next_audio(state)
            audio[pts] = samples

    task = asyncio.get_running_loop().create_task(pull_audio())
    t = time.perf_counter()
    while len(video) < T + 5:
        pts, img = await s.next_video()
        j = int(round(img[0, 0, 0] + 256 * img[0, 0, 1]))
        video.append((pts, j, img[0, 0, 2]))
        if len(video) % 2000 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    task.cancel()
    s.close()
    # the utterance's frames: image says j, pts says when; the ramp says where sample frame_samples(j)[0] went out
    drift = []
    start = None
    for pts, j, _ in video:
        if j == 0 and start is None:
            start = pts
        if start is None or j == 0 and pts != start:
            continue
        a = frame_samples(j, av.fps)[0]  # utterance sample of the frame's audio start
        # find the sent audio frame whose ramp carries utterance sample a: search near the expected pts
        k0 = int(round(pts / VIDEO_CLOCK * 16000 / AUDIO_FRAME)) * AUDIO_FRAME
        best = None
        for k in (k0 - AUDIO_FRAME, k0, k0 + AUDIO_FRAME):
            if k not in audio:
                continue
            vals = (audio[k].astype(np.float64) / 32767 + 0.9) / 1.8 * period
            idx = np.flatnonzero(np.abs(vals - a % period) < 1.5)
            if idx.size:
                best = (k + idx[0]) / 16000
                break
        if best is not None:
            drift.append(pts / VIDEO_CLOCK - best)
        if len(drift) >= T:
            break
    d = np.abs(np.asarray(drift))
    minute = int(60 * av.fps)
    return {"minutes": minutes, "frames_checked": int(d.size), "of_frames": T, "max_ms": round(float(d.max()) * 1000, 3),
            "mean_ms": round(float(d.mean()) * 1000, 4), "max_ms_last_minute": round(float(d[-minute:].max()) * 1000, 3),
            "wall_s": round(time.perf_counter() - t, 1)}


# ------------------------------------------------------------------------------------------ E. landmark sync


async def _record_utterance(base: str, server, avatar: str, speech: np.ndarray) -> tuple[list, list]:
    """Received frames (client side) and the server's sent frames (utterance index or -1), in order."""
    from talkinghead.serve.client import Client

    c = Client(base, keep_images=True)
    await c.connect(avatar)
    await c.wait_frames(5, 60)
    sess = server.sessions[c.session]
    sent = []

    def rec(kind, n, frame):
        if kind == "video":
            sent.append((n, frame.source, frame.image))

    sess.recorder = rec
    await asyncio.sleep(0.5)
    await c.speak(wav_bytes(speech))
    while not any(x[1] == "utterance" for x in sent):
        await asyncio.sleep(0.2)
    while sent[-1][1] == "utterance" or len(c.received.video) < len(sent):  # until the last one came back
        await asyncio.sleep(0.2)
        if sent[-1][1] != "utterance" and len(c.received.video) >= len(sent) - 2:
            await asyncio.sleep(1.0)
            break
    received = list(c.received.video)
    await c.close()
    return received, sent


def bench_sync(base: str, server, avatar_path: Path, avatar: str, thread, work: Path) -> dict:
    """Mouth opening (mediapipe) of the received, VP8-decoded utterance frames vs the offline render of the same
    audio. The session renders every frame here (drop_late off: the clock waits instead), so the comparison
    is of content, not of whether this machine keeps up (the session runs show that)."""
    from talkinghead.eval.sync import articulation_signal, landmark_sync
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.face.landmarks import mouth_opening, track
    from talkinghead.media import read_audio, read_frames
    from talkinghead.methods.render import render_audio

    speech = read_audio(SPEECH)
    offline_mp4 = work / f"offline_{avatar}.mp4"
    render_audio(avatar_path, SPEECH, offline_mp4)
    off_frames = read_frames(offline_mp4, 25.0)
    server.session_options["drop_late"] = False
    try:
        received, sent = thread.call(_record_utterance(base, server, avatar, speech), timeout=900)
    finally:
        server.session_options.pop("drop_late")
    # which sent frames are the utterance's, in order; received frame k is sent frame k + o (find o by image)
    utt = [i for i, s in enumerate(sent) if s[1] == "utterance"]
    imgs_r = [r[2] for r in received]
    best = None
    for o in range(-len(imgs_r) + 1, len(sent)):
        pairs = [(k, k + o) for k in range(len(imgs_r)) if 0 <= k + o < len(sent)]
        if len(pairs) < len(utt):
            continue
        sample = pairs[:: max(1, len(pairs) // 40)]
        err = np.mean([np.abs(imgs_r[k].astype(np.float32) - sent[i][2].astype(np.float32)).mean() for k, i in sample])
        if best is None or err < best[0]:
            best = (err, o)
    o = best[1]
    live = [imgs_r[i - o] for i in utt if 0 <= i - o < len(imgs_r)]
    n = min(len(live), len(off_frames))
    tr_live = track(iter(live[:n]))
    tr_off = track(iter(list(off_frames[:n])))
    m_live, m_off = mouth_opening(tr_live), mouth_opening(tr_off)
    ok = np.isfinite(m_live) & np.isfinite(m_off)
    r = float(np.corrcoef(m_live[ok], m_off[ok])[0, 1])
    lags = {}
    for lag in range(-5, 6):
        a, b = (m_live[lag:], m_off[: n - lag]) if lag >= 0 else (m_live[: n + lag], m_off[-lag:])
        k = np.isfinite(a) & np.isfinite(b)
        lags[lag] = float(np.corrcoef(a[k], b[k])[0, 1])
    art = articulation_signal(compute_audio_features(speech, 25.0, n))
    s_live, s_off = landmark_sync(art, np.nan_to_num(m_live), 25.0), landmark_sync(art, np.nan_to_num(m_off), 25.0)
    return {"avatar": avatar, "frames": int(n), "image_match_l1": round(float(best[0]), 2),
            "utterance_frames_sent": len(utt), "repeated_frames_sent": int(sum(
                np.array_equal(sent[utt[i]][2], sent[utt[i - 1]][2]) for i in range(1, len(utt)))),
            "mouth_r_live_vs_offline": round(r, 3), "best_lag_frames": max(lags, key=lags.get),
            "r_at_best_lag": round(max(lags.values()), 3),
            "landmark_sync_live": {"offset": s_live.offset, "confidence": round(float(s_live.confidence), 3)},
            "landmark_sync_offline": {"offset": s_off.offset, "confidence": round(float(s_off.confidence), 3)}}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avatar", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=16.0, help="length of each concurrency run")
    ap.add_argument("--max-sessions", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: drift,features,whisper,render,"
                                                "sessions,mic,text,sync,faults,browser")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from talkinghead.media import read_audio
    from talkinghead.methods.streaming import DrivenAvatar
    from talkinghead.serve.app import Server
    from talkinghead.serve.client import ServerThread

    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"stamp": stamp(), "part_s": {}}
    cpu0 = time.process_time()
    clock = [time.perf_counter(), time.process_time()]

    def done(part: str, value=None) -> None:
        """Record a part's result and its wall / main-process CPU seconds; the JSON is rewritten after each."""
        if value is not None:
            res[part] = value
            print(part, json.dumps(value, default=str), flush=True)
        now = [time.perf_counter(), time.process_time()]
        res["part_s"][part] = {"wall": round(now[0] - clock[0], 1), "cpu_main": round(now[1] - clock[1], 1)}
        clock[:] = now
        (args.out / "bench_serve.json").write_text(json.dumps(res, indent=1, default=str))

    try:
        if "drift" not in skip:
            done("drift_virtual_clock", asyncio.run(_drift(10.0)))
        if "features" not in skip:
            done("features", bench_features(12.0))
        if "whisper" not in skip:
            done("whisper_stream", bench_whisper_stream(40.0))
            done("utterance_features", bench_utterance())
        avatars = [DrivenAvatar(p) for p in args.avatar]
        done("load_avatars")
        if "render" not in skip:
            done("render_only", bench_render(avatars))
        server = Server(avatars, max_sessions=args.max_sessions)
        server.start_workers(2)
        server.tts.warm()  # as `talkinghead serve` does
        thread = ServerThread(server).start()
        speech = read_audio(SPEECH)
        try:
            if "render" not in skip:
                done("render_processes", bench_render_processes(server, avatars))
            if "sessions" not in skip:
                res["sessions"] = {}
                for av in avatars:
                    runs = []
                    for k in range(1, args.max_sessions + 1):
                        runs.append(thread.call(_sessions(thread.base, server, av.name, k, args.seconds, speech), timeout=900))
                        print(av.name, runs[-1], flush=True)
                    res["sessions"][av.name] = runs
                done("sessions")
            if "mic" not in skip:
                done("mic", {av.name: thread.call(_mic_latency(thread.base, server, av.name, speech), timeout=600) for av in avatars})
            if "text" not in skip:
                done("typed_text", thread.call(_typed_text(thread.base, server, avatars[0].name), timeout=300))
            if "sync" not in skip:
                done("sync", bench_sync(thread.base, server, args.avatar[0], avatars[0].name, thread, args.out))
            if "faults" not in skip:
                done("faults", thread.call(_faults(thread.base, server, avatars[0].name, speech), timeout=600))
            if "browser" not in skip:
                from test_serve_browser import browser_missing, drive_page, thumb_motion

                why = browser_missing()
                if why:
                    res["browser"] = {"skipped": why}
                else:
                    import soundfile

                    mic = args.out / "mic.wav"
                    soundfile.write(str(mic), speech[: 4 * 16000], 16000, subtype="PCM_16")
                    up = args.out / "upload.wav"
                    soundfile.write(str(up), speech, 16000, subtype="PCM_16")
                    page = drive_page(thread.base, avatars[0].name, mic, up, screenshot=args.out / "page.png", seconds=8)
                    res["browser"] = {"status": page["status"], "upload_status": page.get("upload_status"),
                                      "video_samples": len(page["samples"]), "thumb_motion": round(thumb_motion(page["samples"]), 2),
                                      "page_stats": page.get("stats"), "screenshot": str(args.out / "page.png")}
                done("browser", res["browser"])
        finally:
            res["cpu_s_feature_workers"] = _proc_cpu_s(list(getattr(server.workers, "_processes", {}) or {}))
            thread.stop()
            server.workers.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:  # the --both slot's time limit (timeout -s INT): keep what was measured
        res["interrupted"] = "stopped by SIGINT after the parts listed in part_s"
    res["cpu_s_main_process"] = round(time.process_time() - cpu0, 1)
    from benchlib import load

    res["load_average_at_end"] = load()
    (args.out / "bench_serve.json").write_text(json.dumps(res, indent=1, default=str))
    append_entry("## talkinghead serve (bench/bench_serve.py)", _entry(res))


def _proc_cpu_s(pids: list) -> float | None:
    """User + system CPU seconds of the live processes ``pids`` (Linux /proc), None where unreadable."""
    import os

    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return round(total, 1)


def _entry(res: dict) -> str:
    lines = [f"### {res['stamp']}", "", "```json", json.dumps({k: v for k, v in res.items() if k != "stamp"},
                                                             indent=1, default=str), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

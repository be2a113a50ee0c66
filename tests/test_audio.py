"""Audio features: one row per frame, alignment, phones on speech vs silence, normalisation, checks, I/O."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conftest import shared_clip
from talkinghead.audio import AudioFeatures, check_audio, compute_audio_features, load_driving_audio
from talkinghead.audio.phones import CELL_OFFSET_S, PHONES, SIL, PhoneSegment, phone_labels, phone_posteriors
from talkinghead.errors import UserError
from talkinghead.media import read_audio

RATE = 16000


def _burst(seconds: float, start: float, stop: float, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * freq * t) * ((t >= start) & (t < stop))).astype(np.float32)


@pytest.fixture(scope="module")
def may_wave():
    return read_audio(shared_clip("may_en_5s.mp4"))


@pytest.mark.parametrize("fps, seconds, num_frames", [
    (25.0, 2.0, 50),     # exact
    (29.97, 2.0, 75),    # video longer than audio: zero-padded
    (30.0, 3.0, 40),     # audio longer than video: truncated
    (60.0, 1.0, 1),
    (25.0, 1.0, 0),
])
def test_one_row_per_frame(fps, seconds, num_frames):
    wave = _burst(seconds, 0.2, seconds, amp=0.2)
    f = compute_audio_features(wave, fps, num_frames)
    assert f.mel.shape == (num_frames, 80)
    assert f.energy.shape == (num_frames,)
    assert f.phone_ids.shape == (num_frames,)
    assert f.phone_posteriors.shape == (num_frames, len(PHONES))
    np.testing.assert_allclose(f.phone_posteriors.sum(1), 1.0, atol=1e-5)
    stacked = f.stack()
    assert stacked.shape == (num_frames, len(f.names)) and stacked.dtype == np.float32
    assert np.isfinite(stacked).all()
    if num_frames * 1 / fps > seconds + 0.1:  # frames past the audio see zeros
        assert f.energy[-1] == pytest.approx(-100.0)


def test_features_are_aligned_to_frame_times():
    # Silence, then a tone from exactly 2.0 s: frame 50 at 25 fps is the first one centred in sound.
    f = compute_audio_features(_burst(4.0, 2.0, 4.0), 25.0, 100)
    assert f.energy[47] < -90 and f.energy[52] > -20
    # The 1/fps box centred on frame 50 is half silent, half tone: 3 dB below full level.
    assert f.energy[50] == pytest.approx(f.energy[60] - 3.0, abs=0.5)
    band_440 = int(np.argmax(f.mel[60]))
    assert f.mel[47, band_440] < f.mel[60, band_440] - 10


def test_phone_posteriors_and_labels_known_answer():
    # 10 ms log-likelihoods: SIL for 1 s, AA for 1 s, SIL for 1 s (others 50 nats below).
    aa = PHONES.index("AA")
    loglik = np.full((300, len(PHONES)), -50.0, np.float32)
    loglik[:100, SIL] = loglik[200:, SIL] = 0.0
    loglik[100:200, aa] = 0.0
    post = phone_posteriors(loglik, 25.0, 80)
    assert post.shape == (80, len(PHONES))
    np.testing.assert_allclose(post.sum(1), 1.0, atol=1e-5)
    assert post[37, aa] > 0.99 and post[10, SIL] > 0.99
    assert 0.3 < post[25, aa] < 0.6  # frame 25 (1.0 s) sits on the boundary (cells start 7.8 ms late)
    assert post[79, SIL] > 0.99  # past the rows: silence
    off = CELL_OFFSET_S
    segs = [PhoneSegment("SIL", off, 1.0 + off), PhoneSegment("AA", 1.0 + off, 2.0 + off),
            PhoneSegment("SIL", 2.0 + off, 3.0 + off)]
    ids = phone_labels(segs, 25.0, 80)
    assert ids[25] == SIL and ids[26] == aa and ids[50] == aa and ids[51] == SIL and ids[79] == SIL


def test_phones_on_german_speech():
    # The English phone models still segment another language into phones (the papers' DeepSpeech too).
    wave = read_audio(shared_clip("german_anchor_de_20s.mp4"))[: 8 * RATE]
    f = compute_audio_features(wave, 25.0, 200)
    speech = f.phone_ids != SIL
    assert speech.mean() > 0.6 and len(set(f.phone_ids[speech].tolist())) >= 15


def test_phones_on_real_speech(may_wave):
    f = compute_audio_features(may_wave, 25.0, 125)
    speech = f.phone_ids != SIL
    assert speech.mean() > 0.6
    assert len(set(f.phone_ids[speech].tolist())) >= 15  # many different sounds, not one label
    # The acoustic posteriors (no phone language model) mostly agree with the 1-best labels; a wrong
    # senone-to-phone mapping would agree at chance (1/40).
    assert (f.phone_posteriors.argmax(1) == f.phone_ids).mean() > 0.4


@pytest.mark.parametrize("kind", ["zeros", "noise", "hum"])
def test_mostly_silence_without_speech(kind):
    rng = np.random.default_rng(0)
    n = 3 * RATE
    wave = {"zeros": np.zeros(n), "noise": 0.02 * rng.standard_normal(n),
            "hum": 0.001 * np.sin(2 * np.pi * 50 * np.arange(n) / RATE)}[kind].astype(np.float32)
    f = compute_audio_features(wave, 25.0, 75)
    assert (f.phone_ids == SIL).mean() > 0.9


def test_stack_normalisation_does_not_depend_on_level(may_wave):
    loud = compute_audio_features(may_wave, 25.0, 125).stack()
    quiet = compute_audio_features(may_wave * 0.1, 25.0, 125).stack()  # -20 dB
    mel = slice(len(PHONES), len(PHONES) + 80)
    # Without normalisation -20 dB shifts log-mel by 4.6 (1.5 after MEL_SCALE); what is left comes from the
    # few frames whose speech/silence decision changes with the level.
    assert np.median(np.abs(loud[:, mel] - quiet[:, mel])) < 0.1
    assert np.median(np.abs(loud[:, -1] - quiet[:, -1])) < 0.05


def test_names_describe_columns():
    f = compute_audio_features(_burst(1.0, 0.1, 0.9), 25.0, 25)
    names = f.names
    assert names[0] == "phone:SIL" and names[len(PHONES)] == "mel:0" and names[-1] == "energy"
    assert len(names) == len(set(names)) == f.stack().shape[1]


def test_save_load_roundtrip(tmp_path):
    f = compute_audio_features(_burst(1.0, 0.1, 0.9), 25.0, 25)
    f.wav2vec = np.random.default_rng(0).standard_normal((25, 8)).astype(np.float32)
    path = tmp_path / "audio_features.npz"
    f.save(path)
    g = AudioFeatures.load(path)  # allow_pickle=False inside: would fail on object arrays
    assert g.fps == 25.0 and g.phone_names == list(PHONES)
    for name in ("mel", "energy", "phone_ids", "phone_posteriors", "wav2vec"):
        np.testing.assert_array_equal(getattr(f, name), getattr(g, name))
    np.testing.assert_array_equal(f.stack(), g.stack())
    assert [p.name for p in tmp_path.iterdir()] == ["audio_features.npz"]  # no temporary left behind
    with pytest.raises(UserError):
        AudioFeatures.load(tmp_path / "missing.npz")
    f.energy = f.energy[:-1]
    f.save(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="inconsistent"):
        AudioFeatures.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("wave, words", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros(RATE, np.float32), "silent"),
    (np.full(RATE, 5e-4, np.float32), "silent"),
    (0.0005 * np.random.default_rng(0).standard_normal(2 * RATE).astype(np.float32), "nearly silent"),
    (np.array([np.nan] * RATE, np.float32), "invalid"),
])
def test_check_audio_rejects(wave, words):
    with pytest.raises(UserError, match=words) as info:
        check_audio(wave, "take1.wav")
    assert "take1.wav" in str(info.value) and "\n" not in str(info.value)


def test_check_audio_accepts_speech(may_wave):
    check_audio(may_wave, "may")


def test_load_driving_audio(tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(RATE * 2, np.float32), 48000)
    with pytest.raises(UserError, match="silent.wav"):
        load_driving_audio(silent)
    speech = tmp_path / "speech.wav"
    sf.write(speech, _burst(1.0, 0.0, 1.0), 8000)  # resampled to 16 kHz on read
    assert load_driving_audio(speech).shape[0] == pytest.approx(2 * RATE, abs=64)
    with pytest.raises(UserError, match="not found"):
        load_driving_audio(tmp_path / "nope.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(UserError, match="garbage.wav"):
        load_driving_audio(garbage)


def test_imports_stay_light():
    # Training and rendering import these on machines without pocketsphinx or mediapipe (and with numpy 2).
    import subprocess
    import sys

    code = ("import sys, talkinghead.audio, talkinghead.audio.phones, talkinghead.audio.wav2vec, "
            "talkinghead.prepare.masks; "
            "print(sorted(m for m in ('pocketsphinx', 'transformers', 'torch', 'mediapipe', 'cv2', 'av') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""Incremental Whisper features of a live stream (audio/whisper_stream.py) against the offline ones.

Known answers (a tiny random Whisper, so they run anywhere): the log-mel frames are the extractor's; hidden
state 0 (convolutions + positions) equals the offline one with any look-ahead; with a look-ahead reaching the
window's end every hidden state equals the offline one, whatever the block size, and windows past 22 s are
the offline windows; rows come out exactly when their look-ahead is in. Bounded (tiny.en on real speech): the
rows of the default look-ahead, which lack the offline right context.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from talkinghead.audio import whisper as W  # noqa: E402
from talkinghead.audio.whisper_stream import CONV_REACH, LiveWhisperFeatures, WhisperStream  # noqa: E402

from test_audio_whisper import synthetic_signal, tiny_en, tiny_random  # noqa: F401,E402  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RATE, FPS = 16000, 25.0


def _stream(ws, wave: np.ndarray, chunk: int = 320) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All frames of ``wave`` pushed ``chunk`` samples at a time; also (samples pushed, frames out) per push."""
    out, trace, n = [], [], 0
    for i in range(0, len(wave), chunk):
        r = ws.push(wave[i:i + chunk])
        n += r.shape[0]
        trace.append((min(i + chunk, len(wave)), n))
        out.append(r)
    out.append(ws.flush())
    return np.concatenate(out), trace


@pytest.fixture(scope="module")
def tiny(tiny_random):  # noqa: F811
    root, _ = tiny_random
    return W.load_whisper(root / "hf", device="cpu")


def _offline(enc, wave: np.ndarray) -> np.ndarray:
    n = int(np.ceil(len(wave) / RATE * FPS))
    return W.whisper_features(enc, wave, FPS, n).astype(np.float32)


def test_log_mel_frames_are_the_feature_extractors(tiny):
    wave = synthetic_signal()
    ws = WhisperStream(tiny, (0,), FPS, lookahead=1, hop=1)
    _stream(ws, wave, 640)
    ref = tiny.extractor(wave, sampling_rate=RATE, return_tensors="np", padding="max_length")["input_features"][0]
    k = ws.mel_done
    assert k > 290  # 3 s of 10 ms frames
    ours = (np.maximum(ws.mel[:, :k].numpy(), ws.loudest - 8.0) + 4.0) / 4.0
    np.testing.assert_allclose(ours, ref[:, :k], atol=1e-5)


def test_hidden_state_0_equals_offline_with_any_lookahead(tiny):
    """The convolutions read 32.5 ms past a row: exact once that is in (no frame of this signal is 80 dB below
    its loudest, so Whisper's clamp floor does not depend on how much was heard)."""
    wave = synthetic_signal()
    off = _offline(tiny, wave)
    for la, hop in ((0, 1), (1, 3)):
        live, _ = _stream(WhisperStream(tiny, (0,), FPS, la, hop), wave)
        assert live.shape == (off.shape[0], 1, off.shape[2])
        np.testing.assert_allclose(live[:, 0], off[:, 0], atol=2e-3, rtol=2e-3)  # float16 storage
        assert np.abs(live[:, 0] - off[:, 0]).mean() < 1e-4


def test_with_the_whole_window_ahead_every_state_is_offline_whatever_the_blocks(tiny):
    wave = synthetic_signal()
    off = _offline(tiny, wave)
    for hop in (3, 7):
        ws = WhisperStream(tiny, (0, 1, 2), FPS, lookahead=750, hop=hop)  # 30 s: the rest of the window
        live, _ = _stream(ws, wave, 960)
        np.testing.assert_allclose(live, off, atol=2e-3, rtol=2e-3)
        assert np.abs(live - off).mean() < 1e-4
    # a short look-ahead is not exact past state 0: the test above would catch a stream that ignores it
    short, _ = _stream(WhisperStream(tiny, (2,), FPS, 1, 1), wave)
    assert np.abs(short[:, 0] - off[:, 2]).mean() > 1e-3  # 2.8e-3 for this random model, vs < 1e-4 above


def test_windows_past_22_s_are_the_offline_windows(tiny):
    """Core k = [22 k, 22 k + 22) s in the window starting 4 s before it, as whisper_features places frames."""
    rng = np.random.default_rng(1)
    wave = np.tile(synthetic_signal(), 9)[: int(24.5 * RATE)] + 0.001 * rng.standard_normal(int(24.5 * RATE)).astype(np.float32)
    live, _ = _stream(WhisperStream(tiny, (1,), FPS, lookahead=750, hop=25), wave, 16000)
    n = live.shape[0]
    assert n == int(np.ceil(24.5 * FPS))
    times = np.arange(n) / FPS
    first = W.encode_window(tiny, wave[: 30 * RATE], times[:550])[:, 1]
    second = W.encode_window(tiny, wave[18 * RATE:], times[550:] - 18.0)[:, 1]
    np.testing.assert_allclose(live[:550, 0], first, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(live[550:, 0], second, atol=2e-3, rtol=2e-3)


def test_rows_come_out_once_their_lookahead_is_in_and_within_delay_frames(tiny):
    wave = synthetic_signal()
    for la, hop, delay in ((5, 2, 7), (0, 1, 2), (3, 5, 8)):
        ws = WhisperStream(tiny, (1,), FPS, la, hop)
        # 25 fps: frame i is row 2i; a block of frames [a, a + hop) reads rows up to 2 (a + hop - 1) + 2 la
        # (at least the row before the next frame), plus the convolutions' 520 samples
        assert ws.delay_frames == delay
        _, trace = _stream(ws, wave)
        for samples, out in trace:
            covered = int(np.floor(samples / RATE * FPS + 1e-9))
            assert out >= min(covered - delay, len(wave) // 640 - delay)  # every row out by its delay
            if out:  # ... and none before its look-ahead (the last block's, whole)
                last_row = max(2 * (out - 1) + 2 * la, 2 * out - 1)
                assert last_row * 320 + CONV_REACH <= samples
            assert out % hop == 0


def test_live_rows_of_tiny_en_stay_close_to_the_offline_ones(tiny_en, clip):  # noqa: F811
    """The default look-ahead on real speech, as an avatar consumes it (hidden state 2 + relative energy)."""
    from talkinghead.audio.extractor import DatasetExtractor
    from talkinghead.media import read_audio
    from talkinghead.methods.streaming import WHISPER_LIVE, num_frames_of

    wave = read_audio(clip("speech_en_imagine_6s.wav"))
    raw = DatasetExtractor(whisper=W.WhisperChoice())(wave, FPS, num_frames_of(len(wave), FPS))
    off = raw.stack()  # = utterance_features: the offline driving rows
    lf = LiveWhisperFeatures(tiny_en, (2,), FPS, **WHISPER_LIVE)
    live, _ = _stream(lf, wave, 640)
    assert live.shape == off.shape
    h_live, h_off = live[:, :-1], off[:, :-1]
    rel = np.linalg.norm(h_live - h_off, axis=1) / np.linalg.norm(h_off, axis=1)
    a, b = h_live - h_live.mean(0), h_off - h_off.mean(0)
    corr = (a * b).sum() / np.sqrt((a ** 2).sum() * (b ** 2).sum())
    assert np.median(rel) < 0.16, np.median(rel)  # 0.10-0.13 measured (bench_serve.py)
    assert corr > 0.9, corr
    # frame energy is offline's exactly; its reference level is estimated as the stream goes
    np.testing.assert_allclose(lf.energy, raw.energy[-len(lf.energy):], atol=1e-3)
    assert np.abs(live[50:, -1] - off[50:, -1]).max() < 0.15  # < 3 dB after 2 s


def test_the_live_stream_of_a_whisper_dataset_is_incremental(tiny_random):  # noqa: F811
    from talkinghead.methods.streaming import FeatureStream, live_feature_stream

    root, _ = tiny_random
    choice = W.WhisperChoice(checkpoint=str(root / "hf"), layers=(1,))
    fs = live_feature_stream(FPS, choice, None, extract=None)
    assert isinstance(fs, LiveWhisperFeatures) and fs.states.layers == (1,)
    assert W.shared_whisper(choice.checkpoint) is fs.states.enc  # one encoder per process
    # wav2vec columns are not computed incrementally: the windowed extractor takes those datasets
    assert isinstance(live_feature_stream(FPS, choice, "/some/wav2vec", extract=lambda *a: None), FeatureStream)


def test_a_whisper_avatar_is_driven_live_by_the_incremental_stream(tiny_random, tmp_path):  # noqa: F811
    """A tiny GaussianTalker on a dataset with (tiny random) Whisper features: its live stream is the incremental
    one with the process's shared encoder, its rows have the avatar's columns, and speech moves the frame."""
    import dataclasses
    import json

    from test_gaussiantalker import _tiny_config
    from test_methods import write_synthetic_dataset
    from test_streaming import speechlike

    from talkinghead import methods
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.media import read_audio
    from talkinghead.methods import get_method
    from talkinghead.methods.streaming import DrivenAvatar
    from talkinghead.methods.trainer import train

    root, _ = tiny_random
    data = tmp_path / "data"
    data.mkdir()
    write_synthetic_dataset(data)
    meta = json.loads((data / "meta.json").read_text())
    choice = W.WhisperChoice(checkpoint=str(root / "hf"), layers=(1,))
    feats = compute_audio_features(read_audio(data / "audio.wav"), FPS, meta["num_frames"], whisper=choice)
    feats.save(data / "audio_features.npz")
    meta["audio_features"] = {"dims": len(feats.names), "encoder": feats.encoder, "names": feats.names}
    (data / "meta.json").write_text(json.dumps(meta))
    saved = dict(methods._REGISTRY)
    try:
        gt = get_method("gaussiantalker")
        methods._REGISTRY["gaussiantalker"] = dataclasses.replace(gt, make_config=lambda p, v: _tiny_config(5, v))
        train(data, "gaussiantalker", tmp_path / "gt", preset="cpu-small", variant="fast", progress=False)
    finally:
        methods._REGISTRY.clear()
        methods._REGISTRY.update(saved)
    av = DrivenAvatar(tmp_path / "gt")
    lf = av.live_features()
    assert isinstance(lf, LiveWhisperFeatures) and lf.states.enc is W.shared_whisper(choice.checkpoint)
    silent, _ = _stream(lf, np.zeros(RATE, np.float32))
    assert silent.shape == (25, av.info.audio_dim)
    assert np.all(silent[:, -1] == -3.0)  # digital silence: 60 dB (the clip) below the prior speech level
    speech, _ = _stream(av.live_features(), speechlike(1.0))
    with torch.no_grad():
        s = av.open_stream()
        idle = s.render(av.condition(12, silent, 0))
        spoken = s.render(av.condition(12, speech, 0))
    assert (idle - spoken).abs().max() > 0  # the rows reach the picture (5 iterations: barely trained)

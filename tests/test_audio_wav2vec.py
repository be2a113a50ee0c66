"""The optional wav2vec 2.0 / HuBERT path, with tiny randomly initialised models saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from talkinghead.audio import compute_audio_features
from talkinghead.audio.wav2vec import STRIDE_S, OFFSET_S, Wav2VecEncoder, load_wav2vec, wav2vec_features
from talkinghead.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def _save_tiny(folder, kind="wav2vec2"):
    torch.manual_seed(0)
    if kind == "wav2vec2":
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY))
    else:
        model = transformers.HubertModel(transformers.HubertConfig(**TINY))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_tiny_model_through_the_loading_path(tmp_path, kind):
    reference = _save_tiny(tmp_path / "w2v", kind)
    wave = (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)  # 2 s
    f = compute_audio_features(wave, 25.0, 50, wav2vec_model=tmp_path / "w2v")
    assert f.wav2vec.shape == (50, 32) and np.isfinite(f.wav2vec).all()
    assert f.stack().shape[1] == len(f.names) and f.names[-1] == "wav2vec:31"
    # Same numbers as the in-memory model at a frame that falls exactly on a 50 Hz row:
    # frame i at i/25 s is row (i/25 - 0.0125)/0.02; i = 10 -> row 19.375, so compare the interpolation.
    x = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
    with torch.inference_mode():
        hidden = reference(torch.from_numpy(x)[None]).last_hidden_state[0].numpy()
    expect = hidden[19] * 0.625 + hidden[20] * 0.375
    np.testing.assert_allclose(f.wav2vec[10], expect, rtol=1e-4, atol=1e-5)


class _Ramp(torch.nn.Module):
    """Stand-in encoder whose 50 Hz output row n is [n, -n]: checks the resampling, not a network."""

    def forward(self, x):
        n = (x.shape[1] - 400) // 320 + 1
        rows = torch.arange(n, dtype=torch.float32)
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.stack([rows, -rows], 1)[None])


@pytest.mark.parametrize("fps", [25.0, 29.97, 50.0, 60.0])
def test_linear_resampling_to_frame_times(fps):
    wave = np.random.default_rng(1).standard_normal(3 * 16000).astype(np.float32)
    out = wav2vec_features(Wav2VecEncoder(_Ramp(), True), wave, fps, int(2.5 * fps))
    t = np.arange(int(2.5 * fps)) / fps
    expect = np.clip((t - OFFSET_S) / STRIDE_S, 0, None)
    np.testing.assert_allclose(out[:, 0], expect, atol=1e-4)
    np.testing.assert_allclose(out[:, 1], -expect, atol=1e-4)


def test_missing_or_invalid_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_wav2vec(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_wav2vec(tmp_path / "empty")
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=16, vocab_size=10)).save_pretrained(bert)
    with pytest.raises(UserError, match="not a wav2vec"):
        load_wav2vec(bert)
    broken = tmp_path / "broken"
    _save_tiny(broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot load") as info:
        load_wav2vec(broken)
    assert "\n" not in str(info.value)


def test_preprocessor_config_turns_normalisation_off(tmp_path):
    _save_tiny(tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert load_wav2vec(tmp_path / "m").normalize is False


def test_driving_audio_gets_the_wav2vec_columns_its_dataset_was_prepared_with(tmp_path):
    """An avatar trained on wav2vec features must be driven with them too (render reads the dataset's model)."""
    from talkinghead.data import FORMAT
    from talkinghead.methods.render import dataset_audio, driving_features

    _save_tiny(tmp_path / "w2v")
    data = tmp_path / "data"
    data.mkdir()
    meta = {"format": FORMAT, "format_version": 1, "num_frames": 10, "fps": 25.0, "size": [64, 64],
            "split": {"train": [0, 8], "test": [8, 10]}, "options": {"wav2vec_model": str(tmp_path / "w2v")},
            "audio_features": {"encoder": None}}
    (data / "meta.json").write_text(json.dumps(meta))
    wave = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    plain = driving_features(wave, 25.0)
    with_w2v = driving_features(wave, 25.0, data)
    assert with_w2v.shape == (25, plain.shape[1] + 32)
    np.testing.assert_allclose(with_w2v[:, : plain.shape[1]], plain)
    meta["options"]["wav2vec_model"] = None
    (data / "meta.json").write_text(json.dumps(meta))
    assert dataset_audio(data) == (None, None)

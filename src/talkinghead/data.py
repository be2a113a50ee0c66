"""Reading a prepared dataset (the output of ``talkinghead prepare``, see ``docs/dataset.md``).

This is the one way later stages read a dataset. Nothing is preloaded: images, masks and torso
images are decoded from disk when a frame is asked for; the small arrays (tracks, face model, audio
features) are read once, on first use. Only numpy, Pillow (for the image files; it comes with
matplotlib) and soundfile are needed: no cv2, no mediapipe, so it runs on a bare GPU box.

Fields (T frames, H = W = ``size``, E expression dims, V = 478 mesh vertices, F triangles, D audio dims)::

    ds = PreparedDataset(path, size=None)      # size=None: native; else everything scaled to size x size
    ds.meta                dict        meta.json
    ds.num_frames          int         T
    ds.fps                 float
    ds.size                int         H = W of what this reader returns
    ds.K                   [3, 3]      pinhole intrinsics in pixels of ``size`` (``talkinghead.camera``)
    ds.split_indices(name) [N] int64   frame indices of "train" or "test"
    ds.background          [H, W, 3]   float32 in [0, 1], background plate
    ds.tracks              Tracks      every per-frame array at once (below)
    ds.face_model          FaceModel   neutral [V, 3], basis [E, V, 3], triangles [F, 3]
    ds.audio_features      AudioFeatures  per-frame mel, energy, phone ids/posteriors, names
    ds.audio_matrix        [T, D]      float32, ``audio_features.stack()``
    ds.audio_window(i, r)  [2r+1, D]   rows i-r .. i+r of ``audio_matrix``, edge-padded
    ds.audio_wave          [S]         float32 mono 16 kHz, sample 0 at frame 0
    ds.split_audio(name)   [S']        the samples under a split's frames
    ds.frame(i) / ds[i]    Frame       one frame (below); ``len(ds)`` = T

    Frame: index int, image [H, W, 3] float32 in [0, 1], parsing [H, W] uint8 (0 background, 1 torso,
      2 hair / head outside the face, 3 face, 4 inner mouth), torso_image [H, W, 3] float32 (head
      removed, filled from the plate), viewmat [4, 4] (world = head frame, to camera), K [3, 3],
      landmarks [478, 3] (pixels of the image; z same scale, smaller = closer), expression [E],
      blink [2] (right, left eye; 0 open .. 1 closed), mouth_opening float, tracked bool (False where
      interpolated over a detection gap), audio [2r+1, D] (window of radius ``audio_radius``);
      mask properties person, torso, hair, face, mouth, head: bool [H, W].

Head coordinates (the world) are in metres, approximately: the template is scaled so the outer eye
corners are 9 cm apart. Camera translations are in the same unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from talkinghead.errors import UserError

FORMAT = "talkinghead-dataset"
FORMAT_VERSION = 1

# Parsing labels (docs/dataset.md).
BACKGROUND, TORSO, HAIR, FACE, MOUTH = 0, 1, 2, 3, 4


@dataclass
class FaceModel:
    """Person-specific linear face model: ``vertices = neutral + expression @ basis``.

    neutral: [V, 3] head coordinates (metres); basis: [E, V, 3]; triangles: [F, 3] int32 vertex indices
    (consistently wound, normals pointing out of the face). V = 478 mediapipe landmarks, so vertex ``j``
    is landmark ``j`` (the ten iris points belong to no triangle).
    """

    neutral: np.ndarray
    basis: np.ndarray
    triangles: np.ndarray

    @property
    def num_expression(self) -> int:
        return int(self.basis.shape[0])

    def vertices(self, expression):
        """Mesh [..., V, 3] for expression coefficients [..., E] (numpy array or torch tensor)."""
        if hasattr(expression, "new_tensor"):  # torch, without importing it here
            import torch

            basis = torch.as_tensor(self.basis, dtype=expression.dtype, device=expression.device)
            neutral = torch.as_tensor(self.neutral, dtype=expression.dtype, device=expression.device)
            return neutral + torch.einsum("...e,evc->...vc", expression, basis)
        return self.neutral + np.einsum("...e,evc->...vc", np.asarray(expression, np.float32), self.basis)

    def save(self, path: Path) -> None:
        np.savez(path, neutral=self.neutral, basis=self.basis, triangles=self.triangles)

    @classmethod
    def load(cls, path: Path) -> "FaceModel":
        with np.load(path) as z:
            return cls(z["neutral"].astype(np.float32), z["basis"].astype(np.float32),
                       z["triangles"].astype(np.int32))


@dataclass
class Tracks:
    """Per-frame arrays of a clip (landmarks and K in pixels of the reader's ``size``)."""

    landmarks: np.ndarray  # [T, 478, 3]
    viewmats: np.ndarray  # [T, 4, 4] head frame -> camera
    K: np.ndarray  # [3, 3]
    expression: np.ndarray  # [T, E]
    blink: np.ndarray  # [T, 2] right, left; 0 open .. 1 closed
    mouth_opening: np.ndarray  # [T] inner-lip gap / interocular
    tracked: np.ndarray  # [T] bool

    _NAMES = ("landmarks", "viewmats", "K", "expression", "blink", "mouth_opening", "tracked")

    def save(self, path: Path) -> None:
        np.savez(path, **{n: getattr(self, n) for n in self._NAMES})

    @classmethod
    def load(cls, path: Path) -> "Tracks":
        with np.load(path) as z:
            return cls(**{n: z[n] for n in cls._NAMES})

    def scaled(self, s: float) -> "Tracks":
        """The same tracks for images resized by ``s`` (pixel centres at +0.5 make this exact)."""
        K = self.K.copy()
        K[:2] *= s
        return Tracks(self.landmarks * np.float32(s), self.viewmats, K.astype(np.float32), self.expression,
                      self.blink, self.mouth_opening, self.tracked)


@dataclass
class Frame:
    """One frame of a prepared dataset (see the module docstring for every field)."""

    index: int
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    parsing: np.ndarray  # [H, W] uint8 labels
    torso_image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    viewmat: np.ndarray  # [4, 4]
    K: np.ndarray  # [3, 3]
    landmarks: np.ndarray  # [478, 3]
    expression: np.ndarray  # [E]
    blink: np.ndarray  # [2]
    mouth_opening: float
    tracked: bool
    audio: np.ndarray  # [2r+1, D]

    @property
    def person(self) -> np.ndarray:
        return self.parsing != BACKGROUND

    @property
    def torso(self) -> np.ndarray:
        return self.parsing == TORSO

    @property
    def hair(self) -> np.ndarray:
        return self.parsing == HAIR

    @property
    def face(self) -> np.ndarray:
        return self.parsing == FACE

    @property
    def mouth(self) -> np.ndarray:
        return self.parsing == MOUTH

    @property
    def head(self) -> np.ndarray:
        """Hair, face and inner mouth: what a head avatar renders."""
        return self.parsing >= HAIR


def is_dataset(path: Path) -> bool:
    """Whether ``path`` holds a finished prepared dataset."""
    try:
        return json.loads((Path(path) / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_image(path: Path, mode: str) -> np.ndarray:
    """uint8 [H, W, 3] ("RGB") or [H, W] ("L", the parsing labels as stored) of an image file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, ValueError):
        raise UserError(f"cannot read image {path} (dataset incomplete?)") from None


class PreparedDataset:
    """Lazy reader of a prepared dataset folder; ``size`` rescales everything on read (None = native)."""

    def __init__(self, path: str | Path, size: int | None = None, audio_radius: int = 8):
        self.path = Path(path)
        if not is_dataset(self.path):
            raise UserError(f"{self.path} is not a prepared dataset (run: talkinghead prepare VIDEO --out DIR)")
        self.meta: dict = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"{self.path} was written by a newer talkinghead (format "
                            f"{self.meta['format_version']}); upgrade to read it")
        self.native_size = int(self.meta["size"][0])
        self.size = int(size) if size else self.native_size
        if self.size <= 0:
            raise UserError(f"size must be positive, got {size}")
        self.audio_radius = int(audio_radius)

    # --- clip-level -------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    def __len__(self) -> int:
        return self.num_frames

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def scale(self) -> float:
        """Reader size over stored size."""
        return self.size / self.native_size

    @cached_property
    def tracks(self) -> Tracks:
        tracks = Tracks.load(self.path / "tracks.npz")
        return tracks.scaled(self.scale) if self.size != self.native_size else tracks

    @property
    def K(self) -> np.ndarray:
        return self.tracks.K

    def split_indices(self, name: str) -> np.ndarray:
        """Frame indices of the "train" or "test" split: [N] int64."""
        if name not in self.meta["split"]:
            raise UserError(f"unknown split {name!r}; this dataset has {sorted(self.meta['split'])}")
        a, b = self.meta["split"][name]
        return np.arange(a, b, dtype=np.int64)

    @cached_property
    def face_model(self) -> FaceModel:
        return FaceModel.load(self.path / "face_model.npz")

    @cached_property
    def audio_features(self):
        """The per-frame ``AudioFeatures`` (``talkinghead.audio.features``) of the clip's audio."""
        from talkinghead.audio.features import AudioFeatures

        return AudioFeatures.load(self.path / "audio_features.npz")

    @cached_property
    def audio_matrix(self) -> np.ndarray:
        """[T, D] float32: every audio feature of a frame in one row."""
        return np.asarray(self.audio_features.stack(), np.float32)

    def audio_window(self, i: int, radius: int | None = None) -> np.ndarray:
        """[2r+1, D] rows ``i-r .. i+r`` of ``audio_matrix``, edge rows repeated past the clip's ends."""
        r = self.audio_radius if radius is None else int(radius)
        idx = np.clip(np.arange(i - r, i + r + 1), 0, self.num_frames - 1)
        return self.audio_matrix[idx]

    @cached_property
    def audio_wave(self) -> np.ndarray:
        """[S] float32 mono 16 kHz; sample 0 is at frame 0."""
        import soundfile

        wave, _ = soundfile.read(str(self.path / "audio.wav"), dtype="float32", always_2d=False)
        return wave

    def split_audio(self, name: str) -> np.ndarray:
        """[S'] the samples of ``audio_wave`` under the frames of split ``name`` (its first to past its last)."""
        idx = self.split_indices(name)
        a, b = (int(round(i / self.fps * 16000)) for i in (idx[0], idx[-1] + 1))
        return self.audio_wave[a:b]

    @cached_property
    def background(self) -> np.ndarray:
        return self._resize(_read_image(self.path / "background.png", "RGB")).astype(np.float32) / 255.0

    # --- per frame --------------------------------------------------------------------------------
    def _resize(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        if self.size == self.native_size:
            return image
        from PIL import Image

        # Box filter = pixel-area average when shrinking; labels are never blended.
        resample = Image.NEAREST if nearest else (Image.BOX if self.size < self.native_size else Image.BILINEAR)
        return np.asarray(Image.fromarray(image).resize((self.size, self.size), resample=resample))

    def image(self, i: int) -> np.ndarray:
        """[H, W, 3] float32 in [0, 1]."""
        return self._resize(_read_image(self.path / "images" / f"{i:06d}.jpg", "RGB")).astype(np.float32) / 255.0

    def parsing(self, i: int) -> np.ndarray:
        """[H, W] uint8 labels."""
        return self._resize(_read_image(self.path / "parsing" / f"{i:06d}.png", "L"), nearest=True)

    def torso_image(self, i: int) -> np.ndarray:
        """[H, W, 3] float32 in [0, 1]."""
        return self._resize(_read_image(self.path / "torso" / f"{i:06d}.jpg", "RGB")).astype(np.float32) / 255.0

    def frame(self, i: int) -> Frame:
        i = int(i)
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} outside 0..{self.num_frames - 1}")
        t = self.tracks
        return Frame(index=i, image=self.image(i), parsing=self.parsing(i), torso_image=self.torso_image(i),
                     viewmat=t.viewmats[i], K=t.K, landmarks=t.landmarks[i], expression=t.expression[i],
                     blink=t.blink[i], mouth_opening=float(t.mouth_opening[i]), tracked=bool(t.tracked[i]),
                     audio=self.audio_window(i))

    def __getitem__(self, i: int) -> Frame:
        return self.frame(i)

"""``prepare --preview``: see at a glance what the dataset holds.

* ``preview.mp4``: every frame with the parsing labels tinted over it, the 478 landmarks as dots and the
  head-frame axes (x red, y green, z blue, 5 cm long) drawn from the head origin with the frame's viewmat
  and K, with the clip's audio.
* ``preview.png``: plots over time of head rotation and translation, blink per eye, mouth opening and the
  recognised phones (with Whisper features, which carry none: the energy and the speech frames).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from talkinghead import camera, media
from talkinghead.data import Tracks

# RGB tint per parsing label: background none, torso blue, hair orange, face green, inner mouth magenta.
LABEL_COLOURS = np.array([[0, 0, 0], [40, 90, 255], [255, 150, 0], [0, 220, 90], [255, 0, 200]], np.uint8)
TINT = 0.35
AXIS_M = 0.05


def draw_frame(image: np.ndarray, parsing: np.ndarray, landmarks: np.ndarray, viewmat: np.ndarray,
               K: np.ndarray) -> np.ndarray:
    """Overlay of one frame: image [H, W, 3] uint8, parsing [H, W], landmarks [478, 3], viewmat [4, 4], K [3, 3]."""
    import cv2

    # Tint every labelled pixel (background's colour is black, so blending it would darken: keep it).
    blended = cv2.addWeighted(image, 1 - TINT, LABEL_COLOURS[parsing], TINT, 0)
    out = np.where((parsing > 0)[..., None], blended, image)
    scale = max(1, image.shape[0] // 256)
    # cv2 draws at integer pixel centres; continuous coordinates are shifted by half a pixel.
    dots = np.round(landmarks[:, :2] - 0.5).astype(np.int32)
    for x, y in dots.tolist():
        cv2.circle(out, (x, y), scale, (255, 255, 255), -1)
    ends = camera.project(np.array([[0, 0, 0], [AXIS_M, 0, 0], [0, AXIS_M, 0], [0, 0, AXIS_M]], np.float32),
                          viewmat, K)
    origin = tuple(int(v) for v in ends[0] - 0.5)
    for end, colour in zip(ends[1:], ((255, 0, 0), (0, 255, 0), (0, 80, 255))):
        cv2.line(out, origin, tuple(int(v) for v in end - 0.5), colour, 2 * scale, lineType=cv2.LINE_AA)
    return out


def plot_sheet(path: Path, tracks: Tracks, features, fps: float) -> None:
    """The PNG sheet of pose, blink, mouth opening and phones (or energy) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from talkinghead.prepare.pose import euler_deg

    t = np.arange(len(tracks.viewmats)) / fps
    euler = euler_deg(tracks.viewmats)
    fig, axes = plt.subplots(5, 1, figsize=(12, 13), sharex=True)
    for k, name in enumerate(("pitch", "yaw", "roll")):
        axes[0].plot(t, euler[:, k], label=name)
    axes[0].set_ylabel("rotation (deg)")
    trans = tracks.viewmats[:, :3, 3]
    for k, name in enumerate("xyz"):
        axes[1].plot(t, (trans[:, k] - trans[:, k].mean()) * 100, label=f"t{name} - mean")
    axes[1].set_ylabel("translation (cm)")
    axes[2].plot(t, tracks.blink[:, 0], label="right eye")
    axes[2].plot(t, tracks.blink[:, 1], label="left eye")
    axes[2].set_ylabel("blink")
    axes[3].plot(t, tracks.mouth_opening, color="k", label="mouth opening")
    axes[3].set_ylabel("mouth / interocular")
    if features.phone_ids is not None:
        ids = np.asarray(features.phone_ids)
        axes[4].scatter(t, ids, s=4, c=ids, cmap="tab20")
        names = list(features.phone_names)
        used = sorted(set(ids.tolist()))
        axes[4].set_yticks(used)
        axes[4].set_yticklabels([names[i] for i in used], fontsize=6)
        axes[4].set_ylabel("phone")
    else:  # Whisper features carry no phones: the loudness and the speech frames stack() normalises it by
        energy = np.asarray(features.energy)[: len(t)]
        axes[4].plot(t[: len(energy)], energy, color="k", lw=0.8, label="energy")
        axes[4].fill_between(t[: len(energy)], 0, 1, where=features.speech_frames()[: len(energy)], color="tab:green",
                             alpha=0.15, transform=axes[4].get_xaxis_transform(), label="speech frames")
        axes[4].set_ylabel("energy (dBFS)")
    axes[4].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    untracked = ~tracks.tracked.astype(bool)
    if untracked.any():
        for ax in axes[:4]:
            ax.fill_between(t, 0, 1, where=untracked, color="red", alpha=0.15, transform=ax.get_xaxis_transform())
    fig.suptitle("talkinghead prepare: per-frame signals (red bands: interpolated frames)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def write_preview(folder: Path, images: Sequence[np.ndarray], parsing: Sequence[np.ndarray], tracks: Tracks,
                  features, wave: np.ndarray, fps: float, progress: bool = False) -> None:
    """Write folder/preview.mp4 from images [T][H, W, 3] uint8 and parsing [T][H, W], and folder/preview.png.

    ``images`` and ``parsing`` are indexed one frame at a time (arrays, or sequences that read each frame when
    indexed, so a long clip is never held in memory)."""
    from tqdm import tqdm

    frames = (draw_frame(images[i], parsing[i], tracks.landmarks[i], tracks.viewmats[i], tracks.K)
              for i in tqdm(range(len(images)), desc="preview", unit="frame", disable=not progress, leave=False))
    media.write_video(folder / "preview.mp4", frames, fps, audio=wave)
    plot_sheet(folder / "preview.png", tracks, features, fps)

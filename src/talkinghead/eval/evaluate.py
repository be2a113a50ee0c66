"""One evaluation run: a prediction against its ground truth (self-driven) or against audio (cross-driven).

:func:`evaluate` makes two cheap passes over the videos: face-mesh tracking of each (``face.landmarks``),
then one streamed pass over the frame pairs for image metrics and the side-by-side video, so memory does not
grow with the clip length. It returns an :class:`Evaluation`: every metric as a number or ``None`` with the
reason, plus the per-frame series the report plots.

Frame alignment: both videos are decoded at the reference's frame rate (``media.iter_frames``); frame ``i``
of one is compared with frame ``i`` of the other. Unequal lengths are evaluated on the overlap and reported.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from talkinghead.errors import UserError

# name -> (direction, what it is): direction +1 higher is better, -1 lower is better, 0 informative.
METRICS: dict[str, tuple[int, str]] = {
    "psnr_face": (1, "PSNR (dB) over the face mask"),
    "ssim_face": (1, "SSIM over the face mask"),
    "lpips_face": (-1, "LPIPS (AlexNet) on the face mask's bounding box"),
    "psnr_full": (1, "PSNR (dB) over the full frame"),
    "ssim_full": (1, "SSIM over the full frame"),
    "lpips_full": (-1, "LPIPS (AlexNet) over the full frame"),
    "hairline_error": (-1, "mean absolute error (0-255) in a band around the hair-face boundary (GT parsing)"),
    "neck_error": (-1, "mean absolute error (0-255) in a band along the jaw line over the neck (GT parsing)"),
    "fid": (-1, "Frechet Inception Distance"),
    "csim": (1, "identity cosine similarity (CSIM)"),
    "lmd_mouth": (-1, "mouth LMD, pixels at 512 px width"),
    "lmd_all": (-1, "all-landmark LMD, pixels at 512 px width"),
    "lmd_mouth_iod": (-1, "mouth LMD / interocular distance"),
    "lmd_all_iod": (-1, "all-landmark LMD / interocular distance"),
    "mouth_open_corr": (1, "Pearson r of mouth opening, prediction vs ground truth"),
    "blink_error": (-1, "mean absolute blink difference, both calibrated on the ground truth (AU45 stand-in)"),
    "aue_proxy": (-1, "AU-error proxy from landmark distances (not OpenFace AUE)"),
    "stability": (-1, "stability score (GaussianFlameTalk sec. 3.3)"),
    "stability_reference": (0, "stability score of the reference against itself (floor)"),
    "stability_md": (-1, "stability term M_d"),
    "stability_vm": (-1, "stability term V_m"),
    "stability_hf": (-1, "stability term H_f"),
    "landmark_sync_offset": (0, "landmark-sync audio offset (frames, + = audio late)"),
    "landmark_sync_offset_vs_gt": (0, "landmark-sync offset minus the ground truth's"),
    "landmark_sync_conf": (1, "landmark-sync confidence"),
    "syncnet_offset": (0, "SyncNet offset (frames)"),
    "syncnet_conf": (1, "SyncNet confidence (Sync)"),
    "render_fps": (1, "render frames per second"),
    "train_time_s": (-1, "training time (s)"),
}

FID_REASON = ("FID needs Inception-v3 weights (pt_inception-2015-12-05), not available offline; "
              "it is also unreliable on a few hundred frames")
_LPIPS_MIN_PX = 32  # AlexNet's feature maps vanish below this size
CSIM_REASON = "CSIM needs face-recognition weights (ArcFace / CurricularFace), not available offline"


@dataclass
class Clip:
    """A video to evaluate: a way to read its frames (fresh iterator per call) at ``fps``, and its audio."""

    name: str
    fps: float
    frames: Callable[[], Iterator[np.ndarray]]  # each uint8 [H, W, 3]
    audio: Callable[[], np.ndarray | None]  # mono float32 [S] at 16 kHz, or None

    @classmethod
    def from_file(cls, path: str | os.PathLike, fps: float | None = None) -> "Clip":
        from talkinghead import media

        info = media.probe(path)
        if fps is None:
            if info.avg_fps <= 0:
                raise UserError(f"{path}: unknown frame rate")
            fps = info.avg_fps

        def audio() -> np.ndarray | None:
            return media.read_audio(path) if info.has_audio else None

        return cls(str(path), float(fps), lambda: media.iter_frames(path, fps), audio)


@dataclass
class EvalOptions:
    lpips_weights: Path | None = None  # folder holding alex.pth + alexnet-owt-*.pth
    syncnet_weights: Path | None = None  # syncnet_v2.model
    side_by_side: Path | None = None  # where to write GT | prediction | error video (self-driven)
    progress: bool = True


@dataclass
class Evaluation:
    mode: str  # "self-driven" or "cross-driven"
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # why a metric is None
    notes: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    series: dict[str, np.ndarray] = field(default_factory=dict)  # per-frame signals for the plots

    def set(self, name: str, value, reason: str | None = None) -> None:
        self.metrics[name] = value
        if value is None:
            self.reasons[name] = reason or "not computed"


def _track(clip: Clip, what: str, progress: bool) -> np.ndarray:
    from talkinghead.face.landmarks import track

    from tqdm import tqdm

    frames = tqdm(clip.frames(), desc=f"face mesh ({what})", unit="frame", disable=not progress, leave=False)
    return track(frames)


def _require_face(track: np.ndarray, clip: Clip, what: str) -> None:
    if len(track) == 0 or not np.isfinite(track).all(axis=(1, 2)).any():
        raise UserError(f"no face found in the {what} {clip.name}")


def _crop_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of a face mask for LPIPS; None when empty or too small for AlexNet's strides."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0 or min(np.ptp(ys), np.ptp(xs)) < _LPIPS_MIN_PX:
        return None
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


SEAM_REASON = "needs the ground truth's parsing (eval --mask-from DATA, or eval AVATAR --data DATA)"


def _image_pass(pred: Clip, gt: Clip, count: int, gt_track: np.ndarray, parsing_fn, lpips_model, opts, ev,
                audio: np.ndarray | None) -> None:
    """Per-frame PSNR/SSIM/LPIPS (and the seam-band errors with ``parsing_fn``) over ``count`` frame pairs,
    streaming the side-by-side video (with ``audio``)."""
    import torch
    from tqdm import tqdm

    from talkinghead import media

    from . import image_metrics as im
    from .lpips import to_lpips_input

    names = ("psnr_face", "ssim_face", "lpips_face", "psnr_full", "ssim_full", "lpips_full")
    if parsing_fn is not None:
        names += ("hairline_error", "neck_error")
    rows: dict[str, list[float]] = {k: [] for k in names}

    def pairs() -> Iterator[np.ndarray]:
        bar = tqdm(total=count, desc="image metrics", unit="frame", disable=not opts.progress, leave=False)
        for i, (p, g) in enumerate(zip(itertools.islice(pred.frames(), count), gt.frames())):
            if p.shape != g.shape:
                raise UserError(f"frame size differs: prediction {p.shape[1]}x{p.shape[0]}, ground truth "
                                f"{g.shape[1]}x{g.shape[0]} (render at the ground truth's size)")
            if parsing_fn is not None:
                labels = parsing_fn(i, g)
                mask = im.face_mask_from_parsing(labels)
                for name, band in im.seam_bands(labels).items():
                    rows[f"{name}_error"].append(im.mean_abs_error(p, g, band))
            else:
                mask = im.face_mask_from_landmarks(gt_track[i], *g.shape[:2])
            rows["psnr_full"].append(im.psnr(p, g))
            smap = im.ssim_map(p, g)
            rows["ssim_full"].append(im.masked_mean(smap, None))
            rows["psnr_face"].append(im.psnr(p, g, mask))
            rows["ssim_face"].append(im.masked_mean(smap, mask))
            if lpips_model is not None:
                with torch.no_grad():
                    rows["lpips_full"].append(float(lpips_model(to_lpips_input(p), to_lpips_input(g))))
                    box = _crop_box(mask)
                    rows["lpips_face"].append(math.nan if box is None else float(
                        lpips_model(to_lpips_input(p[box]), to_lpips_input(g[box]))))
            bar.update()
            yield np.concatenate([g, p, im.error_heatmap(p, g)], axis=1)
        bar.close()

    if opts.side_by_side is not None:
        media.write_video(opts.side_by_side, pairs(), gt.fps, audio=audio)
    else:
        for _ in pairs():
            pass
    for name, vals in rows.items():
        if name.startswith("lpips") and lpips_model is None:
            continue
        arr = np.array(vals, np.float64)
        ev.series[name] = arr
        finite = arr[~np.isnan(arr)]
        if len(finite) == 0:
            ev.set(name, None, "no frame with that boundary in the ground truth's parsing" if name.endswith("_error")
                   else "no frame with a face mask")
        else:  # mean of per-frame values; a single identical frame makes PSNR inf, reported as such
            ev.set(name, float(finite.mean()))
    missing = int(np.isnan(np.array(rows["psnr_face"])).sum())
    if missing:
        ev.notes.append(f"face metrics skip {missing} frame(s) without a face mask")
    if parsing_fn is None:
        ev.set("hairline_error", None, SEAM_REASON)
        ev.set("neck_error", None, SEAM_REASON)


def _lpips(opts: EvalOptions):
    from .lpips import find_weights, load_lpips

    found = find_weights(opts.lpips_weights)
    if isinstance(found, str):
        return None, found
    return load_lpips(*found), None


def _landmark_sync(audio: np.ndarray | None, track: np.ndarray, fps: float):
    """(SyncResult, articulation [T]) of a face track against audio, or the reason it cannot be computed."""
    from talkinghead.audio.features import check_audio, compute_audio_features
    from talkinghead.face.landmarks import mouth_opening

    from .sync import MAX_OFFSET, articulation_signal, landmark_sync

    if audio is None:
        return "no audio"
    if len(track) < 2 * MAX_OFFSET + 8:
        return f"needs at least {2 * MAX_OFFSET + 8} frames with a face"
    check_audio(audio, "the driving audio")
    art = articulation_signal(compute_audio_features(audio, fps, len(track)))
    return landmark_sync(art, mouth_opening(track), fps), art


def _syncnet(clip: Clip, audio: np.ndarray | None, track: np.ndarray, opts: EvalOptions, ev: Evaluation) -> None:
    from .syncnet import face_crop, find_weights, load_syncnet, syncnet_offset

    found = find_weights(opts.syncnet_weights)
    reason = found if isinstance(found, str) else None
    if reason is None and audio is None:
        reason = "no audio"
    if reason is None and abs(clip.fps - 25.0) > 0.01:
        reason = f"SyncNet is defined at 25 fps, the video is {clip.fps:g} fps"
    if reason is None:
        ok = np.isfinite(track).all(axis=(1, 2))
        first_gap = int(np.argmin(ok)) if not ok.all() else len(ok)
        if first_gap < 5:
            reason = "needs 5 consecutive frames with a face from the start"
    if reason is not None:
        ev.set("syncnet_offset", None, reason)
        ev.set("syncnet_conf", None, reason)
        return
    model = load_syncnet(found)
    crops = np.stack([face_crop(f, track[i]) for i, f in enumerate(itertools.islice(clip.frames(), first_gap))])
    offset, conf = syncnet_offset(model, crops, audio[: int(first_gap / clip.fps * 16000)])
    if first_gap < len(track):
        ev.notes.append(f"SyncNet evaluated on the first {first_gap} frames (face lost after)")
    ev.set("syncnet_offset", offset)
    ev.set("syncnet_conf", conf)


def _stability(pred_track: np.ndarray, ref_track: np.ndarray | None, fps: float, ev: Evaluation) -> None:
    from talkinghead.face.landmarks import NOSE

    from .stability import stability_score

    names = ("stability", "stability_reference", "stability_md", "stability_vm", "stability_hf")
    if ref_track is None:
        for n in names:
            ev.set(n, None, "needs a reference video (--gt, or --ref in cross-driven mode)")
        return
    n = min(len(pred_track), len(ref_track))
    try:
        s = stability_score(pred_track[:n], ref_track[:n], fps)
    except ValueError as exc:
        for name in names:
            ev.set(name, None, str(exc))
        return
    for name, v in zip(names, (s.score, s.reference_score, s.motion_difference, s.motion_variability,
                               s.high_freq_power)):
        ev.set(name, v)
    ev.series["nose_pred"] = pred_track[:n, NOSE[0], :2]
    ev.series["nose_ref"] = ref_track[:n, NOSE[0], :2]


def evaluate(pred: Clip, gt: Clip | None = None, audio: np.ndarray | None = None, ref: Clip | None = None,
             parsing_fn: Callable[[int, np.ndarray], np.ndarray] | None = None,
             opts: EvalOptions | None = None) -> Evaluation:
    """Evaluate ``pred`` against ``gt`` (self-driven) or against ``audio`` alone (cross-driven).

    ``audio`` defaults to the prediction's own sound track, then the ground truth's. ``ref`` is the
    reference video for the stability score in cross-driven mode (the ground truth is used otherwise).
    ``parsing_fn(i, gt_frame) -> uint8 [H, W]`` gives the ground truth's parsing labels (docs/dataset.md):
    the face masks and the seam bands come from it (without it: face masks from the ground truth's face
    oval, no seam-band errors).
    """
    from talkinghead.face.landmarks import mouth_opening

    from .landmark_metrics import landmark_metrics, valid_rows

    opts = opts or EvalOptions()
    ev = Evaluation("self-driven" if gt is not None else "cross-driven")
    ev.set("fid", None, FID_REASON)
    ev.set("csim", None, CSIM_REASON)

    pred_track = _track(pred, "prediction", opts.progress)
    _require_face(pred_track, pred, "prediction")
    ev.inputs["prediction"] = {"path": pred.name, "frames": len(pred_track), "fps": pred.fps}
    face_frac = float(np.isfinite(pred_track).all(axis=(1, 2)).mean())
    if face_frac < 1.0:
        ev.notes.append(f"a face was found in {100 * face_frac:.1f}% of the prediction's frames")
    if audio is None:
        audio = pred.audio()
        if audio is None and gt is not None:
            audio = gt.audio()
            ev.inputs["audio"] = f"sound track of {gt.name}"
        elif audio is not None:
            ev.inputs["audio"] = f"sound track of {pred.name}"
    else:
        ev.inputs["audio"] = "given"

    ref_track = None
    if gt is not None:
        gt_track = _track(gt, "ground truth", opts.progress)
        _require_face(gt_track, gt, "ground truth")
        ev.inputs["ground_truth"] = {"path": gt.name, "frames": len(gt_track), "fps": gt.fps}
        count = min(len(pred_track), len(gt_track))
        if len(pred_track) != len(gt_track):
            ev.notes.append(f"unequal lengths: prediction {len(pred_track)} frames, ground truth "
                            f"{len(gt_track)}; evaluated on the {count} overlapping frames")
        pred_track, gt_track = pred_track[:count], gt_track[:count]
        ev.inputs["evaluated_frames"] = count
        lpips_model, why = _lpips(opts)
        if lpips_model is None:
            ev.set("lpips_face", None, why)
            ev.set("lpips_full", None, why)
        _image_pass(pred, gt, count, gt_track, parsing_fn, lpips_model, opts, ev, audio)
        if valid_rows(pred_track, gt_track).sum() == 0:
            raise UserError("the prediction and the ground truth never show a face in the same frame")
        first = next(iter(gt.frames()))
        ev.inputs["size"] = [int(first.shape[1]), int(first.shape[0])]
        for k, v in landmark_metrics(pred_track, gt_track, first.shape[1]).items():
            ev.set(k, v)
        ev.series["mouth_gt"] = mouth_opening(gt_track)
        ref_track = gt_track
    else:
        for k in ("psnr_face", "ssim_face", "lpips_face", "psnr_full", "ssim_full", "lpips_full", "hairline_error",
                  "neck_error", "lmd_mouth",
                  "lmd_all", "lmd_mouth_iod", "lmd_all_iod", "mouth_open_corr", "blink_error", "aue_proxy"):
            ev.set(k, None, "cross-driven: no ground-truth frames")
        if ref is not None:
            ref_track = _track(ref, "reference", opts.progress)
            _require_face(ref_track, ref, "reference")
            ev.inputs["reference"] = {"path": ref.name, "frames": len(ref_track)}
    ev.series["mouth_pred"] = mouth_opening(pred_track)

    _stability(pred_track, ref_track, pred.fps, ev)
    res = _landmark_sync(audio, pred_track, pred.fps)
    if isinstance(res, str):
        for name in ("landmark_sync_offset", "landmark_sync_conf", "landmark_sync_offset_vs_gt"):
            ev.set(name, None, res)
    else:
        ev.set("landmark_sync_offset", res[0].offset)
        ev.set("landmark_sync_conf", res[0].confidence)
        ev.series["sync_scores"], ev.series["articulation"] = np.array(res[0].scores), res[1]
        if gt is None:
            ev.set("landmark_sync_offset_vs_gt", None, "cross-driven: no ground truth")
        else:
            gt_audio = gt.audio()
            gt_res = _landmark_sync(gt_audio if gt_audio is not None else audio, gt_track, gt.fps)
            if isinstance(gt_res, str):
                ev.set("landmark_sync_offset_vs_gt", None, f"ground truth: {gt_res}")
            else:
                ev.set("landmark_sync_offset_vs_gt", res[0].offset - gt_res[0].offset)
                ev.series["sync_scores_gt"] = np.array(gt_res[0].scores)
    _syncnet(pred, audio, pred_track, opts, ev)
    return ev

"""Benchmark of ``talkinghead prepare``: wall and CPU time per stage, and what it measures on every clip.

    .venv/bin/python bench/bench_prepare.py                 # cnn_anchor_en_71s.mp4 at 512 (the issue's target)
    .venv/bin/python bench/bench_prepare.py --all           # also every clip in ../shared/data: frames, tracking, jitter
    .venv/bin/python bench/bench_prepare.py --all --keep /tmp/prepared --preview   # keep datasets + previews to look at
    .venv/bin/python bench/bench_prepare.py --encoders --before /tmp/main/src   # audio encoder before/after, and
                                                           # the same with another checkout's code as "before"

Runs the real command (``python -m talkinghead.cli prepare``) in a subprocess from a cold start, so the
figure is what a user waits for, imports included. CPU seconds are summed over every process and thread;
on a shared machine they are the steadier figure (wall time grows with the load average, recorded too).
Peak memory is the largest resident set of the command's processes (``wait4``'s ``ru_maxrss``).
``--encoders`` also times prepare's audio step alone (its worker function, ``_compute_audio``, in a fresh
interpreter: imports included) on the clip's audio and on that audio looped 3 times (memory flat in length?).
A ``--before`` tree from before Whisper became the default (no ``--audio-encoder``) runs its only features,
one row each.
Appends a dated entry to the "prepare" section of bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, append_entry, commit, load, machine, now

DATA = ROOT.parent / "shared" / "data"
SECTION = "## prepare (bench/bench_prepare.py)"
TARGET = "cnn_anchor_en_71s.mp4"


def _env(src: Path | None) -> dict | None:
    """The environment that runs the code of the ``src`` folder (None: this checkout's, as installed)."""
    if src is None:
        return None
    return {**os.environ, "PYTHONPATH": str(src)}


def run_prepare(video: Path, out: Path, preview: bool, extra: tuple[str, ...] = (),
                src: Path | None = None) -> tuple[dict, float, float, float]:
    """(meta, wall seconds, CPU seconds, peak resident memory in GB) of one cold ``prepare`` run."""
    cmd = [sys.executable, "-m", "talkinghead.cli", "prepare", str(video), "--out", str(out), "--quiet", *extra]
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd + (["--preview"] if preview else []), stdout=subprocess.DEVNULL, stderr=err,
                                env=_env(src))
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own rusage (its waited-for children included)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"prepare failed on {video.name}: {err.read().strip()}")
    cpu = usage.ru_utime + usage.ru_stime
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # kB on Linux
    return json.loads((out / "meta.json").read_text()), wall, cpu, peak_gb


# prepare's audio worker alone, cold: the audio on the video clock, then the worker function as prepare forks it.
# A tree from before Whisper became the default has no --audio-encoder and a 4-argument worker: it runs its own
# default (the phone + log-mel + energy features). argv: clip, loops, encoder, [.npy for the Whisper features]
_AUDIO_STEP = """
import gc, inspect, json, resource, sys, time
import numpy as np
from talkinghead import media
from talkinghead.prepare.pipeline import _compute_audio
wave = np.tile(media.read_audio(sys.argv[1]), int(sys.argv[2]))
frames = int(len(wave) / media.AUDIO_RATE * 25.0)
collecting = [0.0, 0.0]  # CPU s inside the cyclic garbage collector during the step, start of the current one
gc.callbacks.append(lambda phase, info: collecting.__setitem__(*(
    (1, time.process_time()) if phase == "start" else (0, collecting[0] + time.process_time() - collecting[1]))))
if len(inspect.signature(_compute_audio).parameters) == 4:
    features, wall, cpu = _compute_audio(wave, 25.0, frames, None)
else:
    from talkinghead.audio.whisper import checkpoint_identity, parse_audio_encoder
    whisper = parse_audio_encoder(None if sys.argv[3] == "default" else sys.argv[3])
    if whisper is not None:
        checkpoint_identity(whisper.checkpoint)  # prepare hashes the checkpoint before it forks the worker
    features, wall, cpu = _compute_audio(wave, 25.0, frames, None, whisper)
ru = resource.getrusage(resource.RUSAGE_SELF)
hidden = getattr(features, "whisper", None)
if len(sys.argv) > 4 and hidden is not None:
    np.save(sys.argv[4], hidden)
print(json.dumps({"seconds": len(wave) / media.AUDIO_RATE, "wall": wall, "cpu": cpu, "gc_cpu": collecting[0],
                  "rss_gb": ru.ru_maxrss * 1024 / 1e9, "phones": features.phone_ids is not None,
                  "whisper": hidden is not None}))
"""


def run_audio_step(video: Path, loops: int, encoder: str, src: Path | None, save: Path | None = None,
                   cache: Path | None = None) -> dict:
    """prepare's audio step alone in a fresh interpreter (imports included): its wall / CPU s, peak RSS; with
    ``save``, its Whisper features are written there (.npy) when it computed any; ``cache``: the Whisper trace
    cache folder it uses (``TALKINGHEAD_CACHE``; default: the user's)."""
    cmd = [sys.executable, "-c", _AUDIO_STEP, str(video), str(loops), encoder] + ([str(save)] if save else [])
    env = _env(src)
    if cache is not None:
        env = {**(env or os.environ), "TALKINGHEAD_CACHE": str(cache)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def has_audio_encoder_option(src: Path | None) -> bool:
    """Whether the prepare of ``src`` (None: this checkout) has ``--audio-encoder`` (Whisper by default)."""
    command = (src or ROOT / "src") / "talkinghead" / "prepare" / "command.py"
    return "--audio-encoder" in command.read_text()


def expected_frames(video: Path, fps: float) -> float:
    sys.path.insert(0, str(ROOT / "src"))
    from talkinghead import media

    return media.probe(video).duration_s * fps


INTRO = (
    f"Target (issue 2): the whole prepare of {TARGET} (1779 frames, 512x512) in at most half the clip's "
    "duration (35.6 s) on 2 cores; tracked_fraction >= 0.99; head-pose frame-to-frame jitter < 1 deg "
    "median on every clip. Two readings of head-pose steadiness: *frame-to-frame* = median rotation "
    "between consecutive frames (real head motion + noise); *jitter* = median change of that rotation "
    "from one frame to the next (zero for a steady turn: the noise and jerks a viewer sees as shaking).\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="also prepare every clip in ../shared/data")
    parser.add_argument("--preview", action="store_true", help="write previews in the --all runs")
    parser.add_argument("--keep", type=Path, help="keep the datasets in this folder (default: deleted)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to bench/RESULTS.md")
    parser.add_argument("--encoders", action="store_true",
                        help="before/after of the audio encoder: the target with --audio-encoder none, then with "
                             "the default Whisper (one table, cold starts), and the audio step alone")
    parser.add_argument("--before", type=Path, default=None, metavar="SRC",
                        help="with --encoders: also run each row with the code of this src folder (e.g. a "
                             "checkout of main), labelled 'before'")
    args = parser.parse_args()
    if not (DATA / TARGET).exists():
        raise SystemExit(f"shared data not found: {DATA}")
    when = now()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    keep.mkdir(parents=True, exist_ok=True)
    lines = []
    try:
        load_before = load()
        meta, wall, cpu, peak_gb = run_prepare(DATA / TARGET, keep / Path(TARGET).stem, preview=False)
        t = meta["timings_s"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total")
        duration = meta["num_frames"] / meta["fps"]
        lines += [f"### {machine()}; {when}; commit {commit()}; load average {load_before} before, {load()} after",
                  "",
                  f"`{TARGET}`, 512x512, no preview, cold start: **{wall:.1f} s wall** "
                  f"({wall / duration:.2f} x the clip's {duration:.1f} s; target <= 0.5), {cpu:.1f} CPU s over all "
                  f"processes, peak resident memory {peak_gb:.2f} GB; {meta['num_frames']} frames, "
                  f"tracked_fraction {meta['tracked_fraction']:.4f}, "
                  f"frame-to-frame {meta['pose']['frame_to_frame_deg_median']:.3f} deg median, jitter "
                  f"{meta['pose']['jitter_deg_median']:.3f} deg median.",
                  "",
                  f"Stage seconds inside the run (audio runs in a second process, overlapped): {stages}; "
                  f"total {t['total']:.1f}; CPU s {meta['cpu_s']}. Face model: E = {meta['face_model']['num_expression']}, "
                  f"explained variance {meta['face_model']['explained_variance']:.4f}, fit error "
                  f"{meta['face_model']['fit_error_mm']:.3f} mm, reprojection "
                  f"{meta['face_model']['reprojection_error_px']:.3f} px."]
        if args.encoders:
            lines += ["", f"Audio encoder before/after on {TARGET} (cold starts, one after the other):", "",
                      "| --audio-encoder | load avg before | wall s | x clip | CPU s (all processes) | audio stage s "
                      "| audio process CPU s | peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
            codes = [("", None)] + ([("before: ", args.before)] if args.before else [])
            for enc in ("none", None):
                for label, src in codes:
                    if src is not None and not has_audio_encoder_option(src):
                        if enc is not None:
                            continue  # its only audio features, one row (below, with the default)
                        extra, name = (), "its default (phones + log-mel + energy; no Whisper in that code)"
                    else:
                        extra, name = (("--audio-encoder", enc) if enc else ()), enc or "default (Whisper tiny.en)"
                    before = load()
                    out = keep / f"enc_{enc or 'whisper'}"
                    m, w, c, pk = run_prepare(DATA / TARGET, out, False, extra, src)
                    lines.append(f"| {label}{name} | {before} | {w:.1f} | "
                                 f"{w / duration:.2f} | {c:.1f} | {m['timings_s']['audio']:.1f} | "
                                 f"{m['cpu_s'].get('audio_process', 0):.1f} | {pk:.2f} |")
                    shutil.rmtree(out, ignore_errors=True)
            lines += ["", "prepare's audio step alone (`_compute_audio` in a fresh interpreter, imports included; "
                      "the clip's audio and 3 times it):", "",
                      "| code | --audio-encoder | audio s | load avg before | wall s | x real time | CPU s | "
                      "x real time per CPU s | phones | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
            for enc in ("none", "default"):
                for label, src in codes:
                    old_code = src is not None and not has_audio_encoder_option(src)
                    if old_code and enc != "default":
                        continue
                    for loops in (1, 3):
                        before = load()
                        r = run_audio_step(DATA / TARGET, loops, enc, src)
                        lines.append(f"| {label.rstrip(': ') or 'this commit'} | "
                                     f"{'its default (no Whisper)' if old_code else enc} | {r['seconds']:.1f} | "
                                     f"{before} | {r['wall']:.1f} | {r['seconds'] / r['wall']:.1f} | {r['cpu']:.1f} | "
                                     f"{r['seconds'] / r['cpu']:.1f} | {'yes' if r['phones'] else 'no'} | "
                                     f"{r['rss_gb']:.2f} |")
        if args.all:
            lines += ["", f"Every clip{' (with --preview)' if args.preview else ''}; the {TARGET} row reuses the "
                      "stages of the timed run above (a second run with the same inputs), so its wall time is not "
                      "a cold start.", "", "| clip | frames | duration x fps | tracked_fraction | frame-to-frame deg median (p95) "
                      "| jitter deg median (p95) | crop (x0, y0, side) | E | fit mm | reproj px | wall s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for video in sorted(DATA.glob("*.mp4")):
                meta, wall, _, _ = run_prepare(video, keep / video.stem, preview=args.preview)
                p, f, c = meta["pose"], meta["face_model"], meta["crop"]
                lines.append(
                    f"| {video.name} | {meta['num_frames']} | {expected_frames(video, meta['fps']):.1f} | "
                    f"{meta['tracked_fraction']:.4f} | {p['frame_to_frame_deg_median']:.3f} ({p['frame_to_frame_deg_p95']:.2f}) | "
                    f"{p['jitter_deg_median']:.3f} ({p['jitter_deg_p95']:.2f}) | "
                    f"{c['x0']}, {c['y0']}, {c['side']} | {f['num_expression']} | {f['fit_error_mm']:.3f} | "
                    f"{f['reprojection_error_px']:.3f} | {wall:.1f} |")
    finally:
        if args.keep is None:
            shutil.rmtree(keep, ignore_errors=True)
    entry = "\n".join(lines)
    print(entry)
    if not args.no_write:
        append_entry(SECTION, entry, INTRO)


if __name__ == "__main__":
    main()

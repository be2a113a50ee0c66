"""The Whisper encoder path (talkinghead.audio.whisper): is the weight mapping right, how fast, how much memory.

Not a test. Three parts, each written into the "Whisper encoder" section of bench/RESULTS.md:

* known answer: CTranslate2's own encoder (the runtime the checkpoint was converted for) on the same log-mel
  as ours, 30 s of the cnn clip; max / mean absolute difference of the last hidden state. Needs the
  ``ctranslate2`` wheel on ``--ct2-path`` (a ``pip install --target`` folder; the project does not depend
  on it). With ``--write-fixture`` it also stores CTranslate2's output on a synthetic signal as
  ``tests/data/whisper_tiny_en_ct2.npz``, the known answer tests/test_audio_whisper.py checks without it;
* speed: ``whisper_features`` on the whole clip with 1 and 2 torch threads, wall and CPU seconds, x real time
  (the model load is timed apart);
* memory: peak RSS of a fresh process computing the features of the clip and of the clip three times over
  (memory flat in the clip's length means the two peaks differ by the output array only).

``--audio-step [--before SRC]`` instead: prepare's whole audio step (its worker ``_compute_audio`` in a fresh
interpreter, imports included, as ``bench_prepare.py --encoders`` times it) with the default Whisper on the clip
and on its audio looped 3 times, for this checkout (with a fresh Whisper trace cache: its first run, which traces
the encoder, then runs that find it) and for the code of the ``SRC`` folder (e.g. a checkout of the commit before
a change), one after the other; wall, CPU seconds, x real time per CPU second, peak RSS, and
whether the two codes' Whisper features are identical. Written into the issue-10 section.

    .venv/bin/python bench/bench_whisper.py [--clip CLIP] [--ct2-path DIR] [--write-fixture] [--no-write]
    .venv/bin/python bench/bench_whisper.py --audio-step --before /tmp/old/src [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import ROOT, append_entry, load, stamp

DATA = ROOT.parent / "shared" / "data"
FIXTURE = ROOT / "tests" / "data" / "whisper_tiny_en_ct2.npz"


def synthetic_signal() -> np.ndarray:
    """3 s at 16 kHz: a gliding harmonic tone with syllable-rate amplitude modulation, and a little noise
    (deterministic; the same as tests/test_audio_whisper.py builds)."""
    t = np.arange(48000) / 16000
    f0 = 120 + 60 * t
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * (t > 0.3) * (t < 2.6)
    noise = np.random.default_rng(0).standard_normal(len(t)) * 0.003
    return (0.1 * voice * env + noise).astype(np.float32)


def ct2_check(enc, wave: np.ndarray, ct2_path: Path, write_fixture: bool) -> str:
    sys.path.insert(0, str(ct2_path))
    import ctranslate2
    import torch

    from talkinghead.audio.whisper import package_checkpoint

    path, _ = package_checkpoint()
    model = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=1)

    def both(w):
        mel = enc.extractor(w, sampling_rate=16000, return_tensors="np", padding="max_length")["input_features"]
        ref = np.array(model.encode(ctranslate2.StorageView.from_array(mel.astype(np.float32)), to_cpu=True))[0]
        with torch.inference_mode():
            ours = enc.model(torch.from_numpy(mel)).last_hidden_state[0].numpy()
        return ours, ref

    ours, ref = both(wave[: 30 * 16000])
    diff = np.abs(ours - ref)
    line = (f"CTranslate2 {ctranslate2.__version__} float32 vs ours, last hidden state [1500, 384] of cnn 0-30 s: "
            f"max |diff| {diff.max():.2e}, mean {diff.mean():.2e} (mean |value| {np.abs(ref).mean():.3f}; "
            f"correlation {np.corrcoef(ours.ravel(), ref.ravel())[0, 1]:.9f})")
    if write_fixture:
        ours_s, ref_s = both(synthetic_signal())
        rows = np.arange(0, 150, 5)  # 3 s of real audio = rows 0..149
        FIXTURE.parent.mkdir(exist_ok=True)
        np.savez_compressed(FIXTURE, rows=rows, last_hidden=ref_s[rows].astype(np.float32),
                            ctranslate2=np.array(ctranslate2.__version__))
        line += (f"; fixture {FIXTURE.relative_to(ROOT)} written (synthetic signal, max |ours - ct2| "
                 f"{np.abs(ours_s[rows] - ref_s[rows]).max():.2e})")
    return line


def _peak_child(clip: Path, repeat: int) -> dict:
    code = f"""
import json, resource, time, numpy as np, torch
torch.set_num_threads(1)
from talkinghead.audio.whisper import load_whisper, whisper_features
from talkinghead.media import read_audio
enc = load_whisper()
w = np.tile(read_audio({str(clip)!r}), {repeat})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
h = whisper_features(enc, w, 25.0, int(len(w) / 16000 * 25))
print(json.dumps({{"seconds": len(w) / 16000, "wall": time.perf_counter() - t, "peak_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "before_mb": before / 1024, "out_mb": h.nbytes / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


ISSUE_SECTION = "## Whisper encoder features by default (issue 10)"


def audio_step(clip: Path, before: Path | None, no_write: bool) -> None:
    """prepare's audio step, this checkout against ``before``: speed, memory and the features' identity."""
    import tempfile

    from bench_prepare import run_audio_step

    # this checkout with a fresh trace cache: its first run traces and caches the encoder, the next ones find it
    codes = [("this commit, first run (empty trace cache)", None), ("this commit, cached", None)] \
        + ([(f"before ({before})", before)] if before else [])
    rows, feats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for loops in (1, 3):
            for label, src in codes:
                if loops > 1 and "first run" in label:
                    continue
                held = load()
                save = Path(tmp) / f"{loops}_{len(feats)}.npy"
                r = run_audio_step(clip, loops, "default", src, save, cache=Path(tmp) / "cache")
                feats[(loops, label)] = np.load(save) if r["whisper"] else None
                rows.append(f"| {label} | {r['seconds']:.1f} | {held} | {r['wall']:.2f} | "
                            f"{r['seconds'] / r['wall']:.1f} | {r['cpu']:.2f} | {r['seconds'] / r['cpu']:.1f} | "
                            f"{r['gc_cpu']:.2f} | {r['rss_gb']:.3f} |")
    lines = [f"### {stamp()}", "",
             f"prepare's audio step alone (`pipeline._compute_audio` in a fresh interpreter, imports included, "
             f"`bench/bench_whisper.py --audio-step`), default Whisper tiny.en, `{clip.name}` and its audio looped "
             "3 times:", "",
             "| code | audio s | load avg before | wall s | x real time (wall) | CPU s | x real time per CPU s "
             "| of it in garbage collections, CPU s | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|", *rows]
    if before:
        for loops in (1, 3):
            a, b = feats[(loops, codes[1][0])], feats[(loops, codes[2][0])]
            if a is None or b is None or a.shape != b.shape:
                lines.append(f"- features, {loops}x: not comparable (shapes "
                             f"{None if a is None else a.shape} / {None if b is None else b.shape})")
                continue
            diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
            lines.append(f"- Whisper features {list(a.shape)} float16, {loops}x the audio, this commit vs before: "
                         f"{'bit-identical' if np.array_equal(a, b) else 'NOT identical'} (max |diff| "
                         f"{diff.max():.3g}, {int((diff > 0).sum())} of {diff.size} values differ)")
    block = "\n".join(lines) + "\n"
    print(block)
    if not no_write:
        append_entry(ISSUE_SECTION, block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", type=Path, default=DATA / "cnn_anchor_en_71s.mp4")
    ap.add_argument("--ct2-path", type=Path, default=None, help="folder holding the ctranslate2 package")
    ap.add_argument("--write-fixture", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--audio-step", action="store_true", help="time prepare's audio step instead (see above)")
    ap.add_argument("--before", type=Path, default=None, metavar="SRC",
                    help="with --audio-step: also run the code of this src folder and compare the features")
    args = ap.parse_args()
    if args.audio_step:
        audio_step(args.clip, args.before, args.no_write)
        return
    import torch

    from talkinghead.audio.whisper import load_whisper, whisper_features
    from talkinghead.media import read_audio

    t = time.perf_counter()
    enc = load_whisper()
    load_s = time.perf_counter() - t
    wave = read_audio(args.clip)
    seconds = len(wave) / 16000
    lines = [f"### {stamp()}", "", f"`{args.clip.name}` ({seconds:.1f} s), {enc.name}, sha256 {enc.sha256[:16]}...",
             ""]
    if args.ct2_path:
        lines += ["- " + ct2_check(enc, wave, args.ct2_path, args.write_fixture)]
    lines += [f"- model load (importing transformers, reading + mapping the checkpoint): {load_s:.2f} s"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t, c = time.perf_counter(), time.process_time()
        whisper_features(enc, wave, 25.0, int(seconds * 25))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        lines.append(f"- whisper_features, {threads} thread(s): {wall:.2f} s wall ({seconds / wall:.1f}x real time), "
                     f"{cpu:.2f} CPU s")
    for repeat in (1, 3):
        m = _peak_child(args.clip, repeat)
        lines.append(f"- memory, {m['seconds']:.0f} s of audio: peak RSS {m['peak_mb']:.0f} MB (after the model load "
                     f"{m['before_mb']:.0f} MB; the output array {m['out_mb']:.1f} MB), {m['wall']:.1f} s wall")
    block = "\n".join(lines) + "\n"
    print(block)
    if not args.no_write:
        append_entry("## Whisper encoder (bench/bench_whisper.py)", block, intro=(
            "Weight mapping checked against CTranslate2's own encoder; speed and memory of the offline path."))


if __name__ == "__main__":
    main()

"""Where GaussianTalker's rendered mouth opening is lost: the audio -> lip geometry, or the rendering of it.

Not a test. For each trained GaussianTalker avatar, on its dataset's test split (mediapipe opening of the
rendered 512^2 frames against the dataset's tracked opening of the real frames, Pearson r):

* **geometry**: the deformed lower inner-lip vertex Gaussians' mean vertical offset minus the upper ones',
  against the same difference of the tracked mesh (the face model under the frame's tracked expression);
* **network**: the avatar's own render, driven by the frame's audio;
* **oracle**: the same render with every geometry-supervised Gaussian (lips, chin, bound cavity) moved to its
  *tracked* place -- what the appearance shows when the geometry is right.

geometry high + oracle low = the appearance does not render an opening (the cavity, what fills the gap);
oracle high + network low = the audio -> geometry mapping is the cap.

    .venv/bin/python bench/bench_gaussiantalker_mouth.py --data DATA NAME=AVATAR [NAME=AVATAR ...]
        [--jobs 2] [--note TEXT] [--no-write]

Appends an entry to bench/RESULTS.md under "## Whisper encoder features by default (issue 10)".
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from benchlib import append_entry, stamp

SECTION = "## Whisper encoder features by default (issue 10)"
SIZE = 512


def measure(avatar: str, data: str) -> dict[str, float]:
    import torch

    from talkinghead.face.landmarks import LIPS_INNER_LOWER, LIPS_INNER_UPPER, mouth_opening, track
    from talkinghead.methods.data import Conditions
    from talkinghead.methods.trainer import load_model
    from talkinghead.render import low_pass

    torch.set_num_threads(1)
    _, cfg, info, model, _ = load_model(avatar)
    model.eval()
    conds = Conditions(data, SIZE, cfg.data.audio_radius)
    ds, tr = conds.ds, conds.ds.tracks
    idx = ds.split_indices("test")
    gt_open = np.asarray(tr.mouth_opening)[idx]
    pts, vids, w = model.geo_points, model.geo_vertices, model.geo_weights
    vertex = w[:, 0] == 1  # a vertex Gaussian is bound (v, v, v) with weights (1, 0, 0)
    rows = lambda arc: torch.cat([(vertex & (vids[:, 0] == v)).nonzero()[:, 0] for v in arc])
    upper, lower = list(LIPS_INNER_UPPER), list(LIPS_INNER_LOWER)
    up, lo = rows(upper), rows(lower)
    gap, gap_tracked, net, oracle = [], [], [], []
    eps = low_pass(SIZE / info.size)
    to_u8 = lambda img: (img.clamp(0, 1).numpy() * 255).astype(np.uint8)
    with torch.no_grad():
        for i in idx:
            c = conds(int(i))
            g = model.gaussians(c, deform=True)
            off = g["offsets"][pts]
            gap.append(float(off[lo, 1].mean() - off[up, 1].mean()))
            e = torch.from_numpy(np.asarray(tr.expression[i], np.float32))
            d = torch.einsum("e,evc->vc", e, model.expression_basis)
            gap_tracked.append(float(d[lower, 1].mean() - d[upper, 1].mean()))
            net.append(to_u8(model._raster(g, c.viewmat, c.K, c.backdrop, eps)))
            g = model._at_tracked_place(g, e)  # as the training renders place them (tracked_lips)
            oracle.append(to_u8(model._raster(g, c.viewmat, c.K, c.backdrop, eps)))

    def r(frames):
        mo = mouth_opening(track(iter(frames)))
        ok = np.isfinite(mo)
        return float(np.corrcoef(mo[ok], gt_open[ok])[0, 1])

    gap, gap_tracked = np.array(gap), np.array(gap_tracked)
    return {"geometry": float(np.corrcoef(gap, gap_tracked)[0, 1]), "gap_std_mm": float(gap.std() * 1e3),
            "tracked_std_mm": float(gap_tracked.std() * 1e3), "network": r(net), "oracle": r(oracle),
            "frames": len(idx)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("avatars", nargs="+", help="NAME=AVATAR_DIR")
    ap.add_argument("--data", required=True, help="the prepared dataset the avatars were trained on")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--note", default="", help="a line above the table (what the avatars are)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    names, paths = zip(*(a.split("=", 1) for a in args.avatars))
    heading = stamp()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(measure, paths, [args.data] * len(paths)))
    lines = [f"### {heading}", "", f"**GaussianTalker's mouth: geometry vs rendering** (bench/bench_gaussiantalker_mouth.py; "
             f"`{args.data}`, test split, {results[0]['frames']} frames, mediapipe on {SIZE}^2 renders vs the tracked opening "
             f"of the real frames). {args.note}".rstrip(), "",
             "| avatar | geometry: lip gap r vs tracked (std mm, tracked) | network render mouth r | oracle render (lips at their tracked place) mouth r |",
             "|---|---|---|---|"]
    for n, m in zip(names, results):
        lines.append(f"| {n} | {m['geometry']:.3f} ({m['gap_std_mm']:.2f} / {m['tracked_std_mm']:.2f}) | "
                     f"{m['network']:.3f} | {m['oracle']:.3f} |")
    entry = "\n".join(lines)
    print(entry)
    if not args.no_write:
        append_entry(SECTION, entry)


if __name__ == "__main__":
    main()

"""The output path (issue 13): render at any size, and the avatar pasted back into the full source frame.

Not a test. Steps (the machine's load average is recorded: the 2 cores are shared):

1. four kinds of clip, each a prepared dataset whose source video is at hand: square (cnn, 512^2, the crop is
   the whole frame), offset crop (retalk_man_suit_6s, 700^2, crop clipped to the frame's top edge), low-res
   non-square (lowres_woman, 200x278) and wide (1280x720, made here from may_en_5s: the 512^2 clip scaled to
   600^2 over a blurred, stretched copy of itself). Clips without an avatar get a tiny GaussianTalker
   (``--tiny-iterations``; its head is crude, the point is the compositing);
2. per clip, ``render_split(test)`` full frame, the frames taken before encoding: outside the crop box they
   must equal the source frame (decoded independently with ``media.iter_frames``): max |difference|; inside,
   the pixels that differ from the render lie in the feathered band. A PNG of one frame per clip: source |
   output | |output - source| x4 with the crop box drawn. And the dataset's own crop image pasted back in
   place of a render: PSNR against the source inside the box (does the box sit where the crop was cut?);
3. the 128^2-trained cnn avatar on its test split: rendered at 512^2 vs bicubic upsampling of its 128^2
   render, PSNR/SSIM on the face (dataset parsing) against the 512^2 ground truth, beside its 128^2 figures;
4. render FPS at 128^2, 256^2, 512^2 (wall and this thread's CPU time), paste-back cost per frame at 1280x720
   and the source decoding rate there.

    python bench/bench_output.py --cnn-avatar AVATAR [--work /work/scratch/output/bench] [--every 2] [--no-write]

Appends an entry to bench/RESULTS.md under "## Output: render size and full-frame paste-back".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from benchlib import CLI, ROOT, append_entry, stamp
from talkinghead import media
from talkinghead.eval.image_metrics import face_mask_from_parsing, psnr, ssim
from talkinghead.methods.data import Conditions, open_dataset
from talkinghead.methods.render import render_split, resolve_output
from talkinghead.methods.trainer import load_model
from talkinghead.render.composite import PasteBack, resize_image, to_uint8

SHARED = ROOT.parent / "shared" / "data"
SECTION = "## Output: render size and full-frame paste-back (bench/bench_output.py)"


def make_wide_clip(src: Path, out: Path) -> Path:
    """A 1280x720 clip with sound: ``src``'s frames scaled to 600^2 at (400, 60) over a blurred stretch of them."""
    import av
    import cv2

    if out.exists():
        return out
    tmp = out.with_suffix(".tmp.mp4")
    with av.open(str(src)) as inp, av.open(str(tmp), mode="w") as dst:
        vin = inp.streams.video[0]
        vs = dst.add_stream("libx264", rate=Fraction(25))
        vs.width, vs.height, vs.pix_fmt = 1280, 720, "yuv420p"
        vs.options = {"crf": "16", "preset": "veryfast"}
        for frame in inp.decode(vin):
            img = frame.to_ndarray(format="rgb24")
            canvas = cv2.GaussianBlur(cv2.resize(img, (1280, 720), interpolation=cv2.INTER_LINEAR), (0, 0), 12)
            canvas[60:660, 400:1000] = cv2.resize(img, (600, 600), interpolation=cv2.INTER_AREA)
            for pkt in vs.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                dst.mux(pkt)
        for pkt in vs.encode():
            dst.mux(pkt)
    tmp.rename(out)  # no sound track: prepare takes src's with --audio
    return out


def run(cmd: list) -> None:
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(["nice", "-n", "10", *cmd], check=True)


def ensure_dataset(video: Path, out: Path, audio: Path | None = None) -> Path:
    if not (out / "meta.json").exists():
        run([*CLI, "prepare", video, "--out", out, *(["--audio", audio] if audio else [])])
    return out


def ensure_avatar(data: Path, out: Path, iterations: int) -> Path:
    if not (out / "model.safetensors").exists():
        run([*CLI, "train", data, "--method", "gaussiantalker", "--out", out, "--iterations", iterations])
    return out


def split_source_frames(video: Path, fps: float, indices: np.ndarray) -> dict[int, np.ndarray]:
    """Source frames at ``indices``, decoded from the start with ``iter_frames`` (not the renderer's reader)."""
    want, out = set(int(i) for i in indices), {}
    for i, frame in enumerate(media.iter_frames(video, fps)):
        if i in want:
            out[i] = frame
        if i >= max(want):
            break
    return out


def captured_render(avatar: Path, data: Path, out_mp4: Path, size: int | None) -> tuple[dict, list[np.ndarray]]:
    """render_split(test) full frame, with the frames the encoder received."""
    frames: list[np.ndarray] = []
    real = media.write_video

    def spy(path, it, fps, **kw):
        def tee():
            for f in it:
                frames.append(f.copy())
                yield f
        return real(path, tee(), fps, **kw)

    media.write_video = spy
    try:
        res = render_split(avatar, data, "test", out_mp4, size=size, full_frame=True)
    finally:
        media.write_video = real
    return res, frames


def draw_box(img: np.ndarray, paste: PasteBack, colour=(0, 255, 0)) -> np.ndarray:
    img = img.copy()
    rows, cols, _, _ = paste.box
    for r in (rows.start, rows.stop - 1):
        img[r, cols] = colour
    for c in (cols.start, cols.stop - 1):
        img[rows, c] = colour
    return img


def clip_check(name: str, avatar: Path, data: Path, work: Path, size: int | None) -> dict:
    """Step 2 for one clip (crop rendered at ``size``, None: render's default)."""
    from PIL import Image

    res, frames = captured_render(avatar, data, work / f"{name}_test_full.mp4", size)
    ds = open_dataset(data)
    idx = ds.split_indices("test")
    output = resolve_output(data, size=size, full_frame=True)
    paste = output.paste
    source = split_source_frames(output.source, ds.fps, idx)
    rows, cols, crows, ccols = paste.box
    outside = np.ones((paste.height, paste.width), bool)
    outside[rows, cols] = False
    max_out = 0
    w = paste.weight[..., 0]
    for k, frame in enumerate(frames):
        src = source[int(idx[k])]
        max_out = max(max_out, int(np.abs(frame[outside].astype(int) - src[outside].astype(int)).max(initial=0)))
    # Where the weight is 1 the output is the render itself (checked against a fresh render of frame 0).
    _, cfg, _, model, _ = load_model(avatar)
    conds = Conditions(data, output.size, cfg.data.audio_radius)
    with torch.no_grad():
        own = to_uint8(resize_image(model.render(conds(int(idx[0]))), paste.side, paste.side))[crows, ccols]
    core = w == 1.0
    band_ok = bool(np.array_equal(frames[0][rows, cols][core], own[core]))
    # The dataset's own crop image pasted back: does the box sit where the crop was cut?
    gt = torch.from_numpy(ds.image(int(idx[0])))
    gt_paste = paste(source[int(idx[0])], gt)
    box_psnr = psnr(gt_paste[rows, cols], source[int(idx[0])][rows, cols])
    k = len(frames) // 2
    src = source[int(idx[k])]
    diff = np.clip(np.abs(frames[k].astype(int) - src.astype(int)) * 4, 0, 255).astype(np.uint8)
    sheet = np.concatenate([src, draw_box(frames[k], paste), draw_box(diff, paste, (0, 160, 255))], 1)
    png = work / f"{name}_frame.png"
    Image.fromarray(sheet).save(png)
    return {"clip": name, "source": f"{paste.width}x{paste.height}", "crop": res["crop"], "band": paste.feather,
            "render": res["render_size"][0], "frames": len(frames), "max_diff_outside": max_out,
            "core_is_render": band_ok, "box_px": int((rows.stop - rows.start) * (cols.stop - cols.start)),
            "gt_paste_psnr_box": round(box_psnr, 2), "paste_ms": res["paste_ms"], "png": str(png),
            "video": f"{res['video_size'][0]}x{res['video_size'][1]}"}


def size_quality(avatar: Path, data: Path, every: int) -> dict:
    """Step 3: face PSNR/SSIM of 512^2 renders, bicubic 128 -> 512, and the 128^2 figures."""
    _, cfg, _, model, _ = load_model(avatar)
    r = cfg.data.audio_radius
    c128, c512 = Conditions(data, 128, r), Conditions(data, 512, r)
    gt512, gt128 = open_dataset(data, 512), open_dataset(data, 128)
    idx = gt512.split_indices("test")[::every]
    rows = {k: [] for k in ("psnr512", "ssim512", "psnr_bicubic", "ssim_bicubic", "psnr128", "ssim128",
                            "psnr_gt_bicubic", "ssim_gt_bicubic")}
    with torch.no_grad():
        for i in idx:
            i = int(i)
            small = model.render(c128(i))
            big = to_uint8(model.render(c512(i)))
            up = to_uint8(resize_image(small, 512, 512))
            g512 = np.round(gt512.image(i) * 255).astype(np.uint8)
            g128 = np.round(gt128.image(i) * 255).astype(np.uint8)
            gt_up = to_uint8(resize_image(torch.from_numpy(g128 / 255.0).float(), 512, 512))
            m512, m128 = face_mask_from_parsing(gt512.parsing(i)), face_mask_from_parsing(gt128.parsing(i))
            rows["psnr512"].append(psnr(big, g512, m512))
            rows["ssim512"].append(ssim(big, g512, m512))
            rows["psnr_bicubic"].append(psnr(up, g512, m512))
            rows["ssim_bicubic"].append(ssim(up, g512, m512))
            rows["psnr128"].append(psnr(to_uint8(small), g128, m128))
            rows["ssim128"].append(ssim(to_uint8(small), g128, m128))
            rows["psnr_gt_bicubic"].append(psnr(gt_up, g512, m512))
            rows["ssim_gt_bicubic"].append(ssim(gt_up, g512, m512))
    out = {k: round(float(np.nanmean(v)), 4) for k, v in rows.items()}
    out["frames"] = len(idx)
    return out


def render_speed(avatar: Path, data: Path, n: int) -> dict:
    """Step 4a: render-only FPS at 128, 256, 512 (wall; this thread's CPU)."""
    _, cfg, _, model, _ = load_model(avatar)
    ds = open_dataset(data)
    idx = ds.split_indices("test")[:n]
    out = {}
    for size in (128, 256, 512):
        conds = Conditions(data, size, cfg.data.audio_radius)
        cs = [conds(int(i)) for i in idx]
        with torch.no_grad():
            model.render(cs[0])  # warm-up
            t, c = time.perf_counter(), time.thread_time()
            for cond in cs:
                model.render(cond)
            wall, cpu = time.perf_counter() - t, time.thread_time() - c
        out[size] = {"fps_wall": round(n / wall, 2), "fps_cpu": round(n / cpu, 2)}
    return out


def paste_cost(data: Path, n: int = 60) -> dict:
    """Step 4b: paste-back per frame at the wide clip's 1280x720 (a 512^2 render), and decoding the source."""
    output = resolve_output(data, full_frame=True)
    paste = output.paste
    reader = media.FrameReader(output.source, open_dataset(data).fps)
    t, c = time.perf_counter(), time.process_time()
    frames = list(reader.frames(range(n)))
    decode = {"fps_wall": round(n / (time.perf_counter() - t), 1), "fps_cpu": round(n / (time.process_time() - c), 1)}
    render = torch.rand(512, 512, 3, generator=torch.Generator().manual_seed(0))
    paste(frames[0], render)
    t, c = time.perf_counter(), time.thread_time()
    for f in frames:
        paste(f, render)
    return {"frame": f"{paste.width}x{paste.height}", "crop": paste.side,
            "paste_ms_wall": round(1000 * (time.perf_counter() - t) / n, 2),
            "paste_ms_cpu": round(1000 * (time.thread_time() - c) / n, 2), "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cnn-avatar", type=Path, required=True, help="GaussianTalker cpu-small trained on cnn")
    ap.add_argument("--cnn-data", type=Path, default=Path("/work/data/cnn_anchor_en_71s"))
    ap.add_argument("--lowres-data", type=Path, default=Path("/work/data/lowres_woman_11s_200x278_29.97fps"))
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/output/bench"))
    ap.add_argument("--tiny-iterations", type=int, default=30)
    ap.add_argument("--check-size", type=int, default=256, help="render size of step 2 (0: render's default)")
    ap.add_argument("--every", type=int, default=4, help="step 3 uses every this many test frames")
    ap.add_argument("--speed-frames", type=int, default=12)
    ap.add_argument("--cnn-note", default="", help="what to say about the cnn avatar in the entry")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.check_size = args.check_size or None
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    suit = ensure_dataset(SHARED / "retalk_man_suit_6s.mp4", work / "suit_data")
    wide_video = make_wide_clip(SHARED / "may_en_5s.mp4", work / "may_wide_1280x720.mp4")
    wide = ensure_dataset(wide_video, work / "wide_data", audio=SHARED / "may_en_5s.mp4")
    clips = [("square", args.cnn_avatar, args.cnn_data),
             ("offset", ensure_avatar(suit, work / "suit_avatar", args.tiny_iterations), suit),
             ("lowres", ensure_avatar(args.lowres_data, work / "lowres_avatar", args.tiny_iterations),
              args.lowres_data),
             ("wide", ensure_avatar(wide, work / "wide_avatar", args.tiny_iterations), wide)]
    checks = []
    for name, avatar, data in clips:
        checks.append(clip_check(name, avatar, data, work, args.check_size))
        print(json.dumps(checks[-1]), flush=True)
    quality = size_quality(args.cnn_avatar, args.cnn_data, args.every)
    print(json.dumps(quality), flush=True)
    speed = render_speed(args.cnn_avatar, args.cnn_data, args.speed_frames)
    print(json.dumps(speed), flush=True)
    cost = paste_cost(wide)
    print(json.dumps(cost), flush=True)
    (work / "results.json").write_text(json.dumps({"checks": checks, "quality": quality, "speed": speed,
                                                   "paste": cost}, indent=1))
    if args.no_write:
        return

    log_path = args.cnn_avatar / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    lines = [f"### {stamp()}", "",
             f"cnn avatar: `{args.cnn_avatar}` (GaussianTalker cpu-small, 128^2, "
             f"{log.get('iterations', '?')} iterations{'; ' + args.cnn_note if args.cnn_note else ''}); tiny avatars for the other clips: "
             f"{args.tiny_iterations} iterations (canonical stage only: crude heads, the compositing is what is measured). "
             f"Bench wall time {(time.perf_counter() - t0) / 60:.1f} min.", "",
             "Full frame, test split, frames before encoding:", "",
             "| clip | source | crop (x0, y0, side) | render | band px | frames | max diff outside box | "
             "beyond band = render | dataset crop pasted back: PSNR in box | paste ms/frame |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        cr = c["crop"]
        lines.append(f"| {c['clip']} | {c['source']} | ({cr['x0']}, {cr['y0']}, {cr['side']}) | {c['render']}^2 | "
                     f"{c['band']} | {c['frames']} | {c['max_diff_outside']} | {c['core_is_render']} | "
                     f"{c['gt_paste_psnr_box']} dB | {c['paste_ms']} |")
    q = quality
    lines += ["", f"cnn test split ({q['frames']} frames, every {args.every}th), face region (dataset parsing), "
                  "before encoding:", "",
              "| | PSNR face | SSIM face |", "|---|---|---|",
              f"| rendered at 512^2 vs 512^2 GT | {q['psnr512']:.2f} | {q['ssim512']:.4f} |",
              f"| 128^2 render, bicubic to 512^2, vs 512^2 GT | {q['psnr_bicubic']:.2f} | {q['ssim_bicubic']:.4f} |",
              f"| 128^2 render vs 128^2 GT | {q['psnr128']:.2f} | {q['ssim128']:.4f} |",
              f"| (ceiling) 128^2 GT, bicubic to 512^2, vs 512^2 GT | {q['psnr_gt_bicubic']:.2f} | "
              f"{q['ssim_gt_bicubic']:.4f} |", "",
              f"Render speed, cnn avatar, {args.speed_frames} test frames, one torch thread (render calls only):", "",
              "| size | FPS (wall) | FPS (thread CPU time) |", "|---|---|---|"]
    for size, s in speed.items():
        lines.append(f"| {size}^2 | {s['fps_wall']} | {s['fps_cpu']} |")
    lines += ["", f"Paste-back at {cost['frame']} (crop side {cost['crop']}, a 512^2 render resized into it): "
                  f"{cost['paste_ms_wall']} ms/frame wall, {cost['paste_ms_cpu']} ms CPU; decoding that source "
                  f"(media.FrameReader): {cost['decode']['fps_wall']} frames/s wall, "
                  f"{cost['decode']['fps_cpu']} frames/s per CPU second (decoder threads included)."]
    intro = ("Issue 13. `render` writes the full frame by default (the crop pasted back into the source video, "
             "feathered inside the crop border) and renders at any `--size`. Each entry: per kind of clip, the "
             "full-frame frames before encoding against the source (outside the crop box they must be equal), the "
             "128^2-trained cnn avatar rendered at 512^2 against bicubic upsampling, render FPS by size and the "
             "paste-back cost. The PNGs (source | output | |difference| x4, crop box drawn) are written to the "
             "bench's work folder, not committed.")
    append_entry(SECTION, "\n".join(lines) + "\n", intro=intro)


if __name__ == "__main__":
    main()

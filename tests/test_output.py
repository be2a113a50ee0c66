"""The output path: render at any size, full-frame paste-back into the source video, lazy source decoding.

A synthetic non-square source video (90 x 70, an offset 64 px crop) stands behind the synthetic prepared
dataset of test_methods, so the full-frame output can be checked pixel for pixel before encoding.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from talkinghead import media
from talkinghead.fileio import sha256
from talkinghead.methods.base import Condition
from talkinghead.methods.data import Conditions, FrameStore
from talkinghead.methods.render import pingpong, render_audio, render_split
from talkinghead.methods.trainer import load_model, train
from talkinghead.render.composite import PasteBack, resize_image, to_uint8

from talkinghead.cli import main
from test_methods import FPS, SIZE, write_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC_W, SRC_H, CROP = 90, 70, {"x0": 20, "y0": 6, "side": SIZE}


def write_video(path: Path, frames: np.ndarray, fps: float, gop: int) -> None:
    """H.264 with a keyframe every ``gop`` frames (so that seeking has keyframes to land on)."""
    import av

    with av.open(str(path), mode="w") as out:
        vs = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"g": str(gop), "keyint_min": str(gop), "crf": "10", "preset": "veryfast"}
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)


def numbered_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Frames whose content changes with their number (a smooth pattern shifted per frame)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 3 + i * 7) % 256
        out[i, ..., 1] = (yy * 3 + i * 11) % 256
        out[i, ..., 2] = (i * 5) % 256
    return out


@pytest.fixture(scope="module")
def full_dataset(tmp_path_factory) -> Path:
    """The synthetic dataset, prepared (so its meta says) from a 90 x 70 video with the crop at (20, 6)."""
    root = tmp_path_factory.mktemp("fullframe")
    data = root / "data"
    write_synthetic_dataset(data)
    meta = json.loads((data / "meta.json").read_text())
    video = root / "source.mp4"
    write_video(video, numbered_frames(meta["num_frames"], SRC_H, SRC_W), FPS, gop=6)
    meta["source"] = {"path": str(video), "sha256": sha256(video)}
    meta["crop"] = CROP
    (data / "meta.json").write_text(json.dumps(meta))
    return data


@pytest.fixture(scope="module")
def toy_avatar(full_dataset, tmp_path_factory) -> Path:
    avatar = tmp_path_factory.mktemp("toy") / "av"
    train(full_dataset, "toy", avatar, preset="cpu-small", iterations=5, progress=False)
    return avatar


def _capture(monkeypatch) -> list:
    """Record the frames the renderer hands to the encoder (before any lossy encoding)."""
    frames: list = []
    real = media.write_video

    def spy(path, it, fps, **kw):
        def tee():
            for f in it:
                frames.append(f.copy())
                yield f
        return real(path, tee(), fps, **kw)

    monkeypatch.setattr(media, "write_video", spy)
    return frames


# ------------------------------------------------------------------------------------------ FrameReader


def test_frame_reader_matches_iter_frames_in_any_order(tmp_path):
    video = tmp_path / "v.mp4"
    write_video(video, numbered_frames(50, 30, 40), 25.0, gop=7)
    for fps in (25.0, 17.0):  # the dataset's clock may differ from the video's (resampled)
        ref = media.read_frames(video, fps)
        reader = media.FrameReader(video, fps, max_bytes=5 * ref[0].nbytes)  # backward chunks of 5 frames
        assert reader.chunk == 5
        n = len(ref)
        order = [pingpong(j, n) for j in range(int(2.5 * n))] + [3, 3, 30, 2, 1, 9, 0, n - 1, 0]
        got = list(reader.frames(order))
        assert len(got) == len(order)
        for i, frame in zip(order, got):
            np.testing.assert_array_equal(frame, ref[i])


def test_frame_reader_on_a_real_clip_with_an_odd_frame_rate(clip):
    path = clip("lowres_woman_11s_200x278_29.97fps.mp4")
    ref = media.read_frames(path, 25.0)[:120]
    reader = media.FrameReader(path, 25.0, max_bytes=16 * ref[0].nbytes)
    order = list(range(100, 120)) + list(range(118, 60, -1)) + [7, 8]
    for i, frame in zip(order, reader.frames(order)):
        np.testing.assert_array_equal(frame, ref[i])


# ------------------------------------------------------------------------------------------ PasteBack


def test_paste_back_keeps_the_source_outside_the_box_and_the_render_beyond_the_band():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd, non-square
    paste = PasteBack(x0=9, y0=4, side=25, width=53, height=37, band=4)
    render = torch.full((25, 25, 3), 0.5)
    out = paste(frame, render)
    assert out.shape == frame.shape and out.dtype == np.uint8
    box = np.zeros((37, 53), bool)
    box[4:29, 9:34] = True
    np.testing.assert_array_equal(out[~box], frame[~box])  # outside the crop box: the source, exactly
    np.testing.assert_array_equal(out[8:25, 13:30], 128)  # beyond the 4 px band: the render, exactly
    w = paste.weight[..., 0]
    assert w.shape == (25, 25) and w[4:21, 4:21].min() == 1.0
    assert 0 < w[0, 12] < w[1, 12] < w[2, 12] < w[3, 12] < 1.0  # the band ramps up from the crop border
    np.testing.assert_allclose(w[:, ::-1], w)  # symmetric on inner edges
    expect = np.floor(frame[4, 21].astype(np.float32) + (128 - frame[4, 21].astype(np.float32)) * w[0, 12] + 0.5)
    np.testing.assert_array_equal(out[4, 21], expect)
    assert not np.array_equal(frame, paste(frame, render)) and np.array_equal(out, paste(frame, render))


def test_paste_back_does_not_feather_edges_on_the_frame_border_and_clips_an_overreaching_crop():
    frame = np.zeros((30, 40, 3), np.uint8)
    white = torch.ones((30, 30, 3))
    # A crop on the top and left border of the frame: those edges are not feathered.
    out = PasteBack(0, 0, 30, 40, 30, band=5)(frame, white)
    np.testing.assert_array_equal(out[:, :25], 255)  # top, bottom (frame border) and left: the render
    assert 0 < out[10, 29, 0] < 255 and np.all(out[:, 30:] == 0)  # the right edge is inside the frame: a band
    # A crop reaching past the frame is pasted where it overlaps it.
    out = PasteBack(-10, 20, 20, 40, 30, band=2)(frame, torch.ones((20, 20, 3)))
    assert np.all(out[22:, :8] == 255) and 0 < out[20, 4, 0] < 255  # band on the inner top and right edges
    assert np.all(out[:20] == 0) and np.all(out[:, 10:] == 0)
    with pytest.raises(ValueError, match="outside"):
        PasteBack(50, 0, 10, 40, 30)


def test_paste_back_resizes_any_render_size_to_the_crop_side():
    frame = np.zeros((70, 90, 3), np.uint8)
    paste = PasteBack.from_meta(CROP, 90, 70)
    render = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1))
    out = paste(frame, render)
    b = paste.feather
    ref = to_uint8(resize_image(render, 64, 64))
    np.testing.assert_array_equal(out[6 + b:70 - b, 20 + b:84 - b], ref[b:64 - b, b:64 - b])
    assert resize_image(render, 16, 16) is render


# ------------------------------------------------------------------------------------------ Conditions


def test_conditions_equal_the_frame_store_and_carry_their_size(full_dataset, toy_avatar):
    _, cfg, info, _, _ = load_model(toy_avatar)
    store = FrameStore(full_dataset, cfg.data, info=info, split="test", with_targets=False, progress=False)
    lazy = Conditions(full_dataset, SIZE, cfg.data.audio_radius)
    for k in (0, 5):
        a, b = store.condition(k), lazy(store.indices[k])
        assert a.index == b.index
        for name in ("viewmat", "K", "backdrop", "audio", "blink"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    big = Conditions(full_dataset, 160, cfg.data.audio_radius)(3)
    assert (big.height, big.width) == (160, 160)
    torch.testing.assert_close(big.K[:2], lazy.K[:2] * 2.5)  # the camera in pixels of the render size


# ------------------------------------------------------------------------------------------ render


def test_render_split_full_frame_is_the_source_outside_the_crop(full_dataset, toy_avatar, tmp_path, monkeypatch):
    frames = _capture(monkeypatch)
    res = render_split(toy_avatar, None, "test", tmp_path / "full.mp4")
    assert res["full_frame"] and res["frame_size"] == [SRC_W, SRC_H] and res["render_size"] == [SIZE, SIZE]
    assert res["frames"] == len(frames) == 8 and res["paste_ms"] >= 0
    assert (media.probe(tmp_path / "full.mp4").width, media.probe(tmp_path / "full.mp4").height) == (SRC_W, SRC_H)
    source = media.read_frames(json.loads((full_dataset / "meta.json").read_text())["source"]["path"], FPS)
    box = np.zeros((SRC_H, SRC_W), bool)
    box[6:70, 20:84] = True
    _, _, _, model, _ = load_model(toy_avatar)
    conds = Conditions(full_dataset, SIZE, 2)
    band = PasteBack.from_meta(CROP, SRC_W, SRC_H).feather
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(frame[~box], source[32 + k][~box])  # test split = frames 32..39
        with torch.no_grad():
            own = to_uint8(model.render(conds(32 + k)))
        # Inside, beyond the band (the bottom edge is the frame's: not feathered), the render itself.
        np.testing.assert_array_equal(frame[6 + band:70, 20 + band:84 - band], own[band:, band:64 - band])
    # --size renders the crop at another size; the output stays at the source's.
    res = render_split(toy_avatar, None, "test", tmp_path / "s.mp4", size=32)
    assert res["render_size"] == [32, 32] and res["frame_size"] == [SRC_W, SRC_H]


def test_render_audio_full_frame_replays_the_source_with_the_pose_loop(full_dataset, toy_avatar, tmp_path,
                                                                      monkeypatch):
    import soundfile

    wav = tmp_path / "drive.wav"
    t = np.arange(int(2.2 * 16000)) / 16000  # past the 32 training frames: the loop turns back
    soundfile.write(str(wav), (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32),
                    16000)
    frames = _capture(monkeypatch)
    res = render_audio(toy_avatar, wav, tmp_path / "drive.mp4")
    assert res["full_frame"] and res["frames"] == len(frames) == int(np.ceil(2.2 * FPS))
    source = media.read_frames(json.loads((full_dataset / "meta.json").read_text())["source"]["path"], FPS)
    outside = np.ones((SRC_H, SRC_W), bool)
    outside[6:70, 20:84] = False
    for j, frame in enumerate(frames):
        np.testing.assert_array_equal(frame[outside], source[pingpong(j, 32)][outside])
    frames.clear()
    res = render_audio(toy_avatar, wav, tmp_path / "crop.mp4", full_frame=False, size=48)
    assert not res["full_frame"] and frames[0].shape == (48, 48, 3)
    assert media.probe(tmp_path / "crop.mp4").width == 48


def test_without_the_source_video_the_crop_is_written_and_full_frame_is_an_error(full_dataset, toy_avatar, tmp_path,
                                                                                   capsys):
    data = tmp_path / "data"
    shutil.copytree(full_dataset, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["source"]["path"] = str(tmp_path / "gone.mp4")
    (data / "meta.json").write_text(json.dumps(meta))
    res = render_split(toy_avatar, data, "test", tmp_path / "c.mp4")
    assert not res["full_frame"] and "gone.mp4 is gone" in res["note"] and res["frame_size"] == [SIZE, SIZE]
    av, out = str(toy_avatar), str(tmp_path / "x.mp4")
    _one_error(capsys, "render", av, "--split", "test", "--data", str(data), "--full-frame", "--out", out,
               match="--full-frame needs the source video")
    # --source points at the moved video (checked by its sha256)
    assert main(["render", av, "--split", "test", "--data", str(data), "--source", meta_source(full_dataset),
                 "--out", out]) == 0
    assert "90x70 full frame" in capsys.readouterr().out
    junk = tmp_path / "other.mp4"
    write_video(junk, numbered_frames(10, SRC_H, SRC_W, 1)[::-1], FPS, gop=5)
    _one_error(capsys, "render", av, "--split", "test", "--data", str(data), "--full-frame", "--source", str(junk),
               "--out", str(tmp_path / "y.mp4"), match="not the video this dataset was prepared from")
    for bad in ("0", "-8", "4097"):
        _one_error(capsys, "render", av, "--split", "test", "--size", bad, "--out", str(tmp_path / "y.mp4"),
                   match="--size must be between")
    assert not list(tmp_path.glob("*y.mp4*"))


def _one_error(capsys, *args: str, match: str) -> None:
    """The CLI in this process (the toy method is registered here): exit 2 and one ``error:`` line."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "frame/s" not in ln]
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def meta_source(data: Path) -> str:
    return json.loads((data / "meta.json").read_text())["source"]["path"]


def test_eval_renders_the_crop_at_its_size_against_the_dataset_crop(full_dataset, toy_avatar, tmp_path, capsys):
    """eval AVATAR compares crop with crop at --size (default: the training size), even with the source at hand."""
    import argparse

    from talkinghead.eval.command import _avatar_run

    for size, expect in ((None, SIZE), (40, 40)):
        args = argparse.Namespace(avatar=toy_avatar, data=full_dataset, size=size)
        out = tmp_path / f"r{expect}"
        out.mkdir()
        pred, gt, mask_fn, speed = _avatar_run(args, out, None)
        p, g = next(iter(pred.frames())), next(iter(gt.frames()))
        assert p.shape == g.shape == (expect, expect, 3)
        assert f"{expect}x{expect}" in speed["measured_on"] and "crop" in speed["measured_on"]
        assert mask_fn(0, g).shape == (expect, expect)
    _one_error(capsys, "eval", "--pred", str(tmp_path / "r40" / "prediction.mp4"), "--gt",
               str(tmp_path / "r40" / "prediction.mp4"), "--size", "64", "--out", str(tmp_path / "rep"),
               match="--size goes with AVATAR")


def test_a_gaussian_method_renders_the_same_picture_at_twice_the_size(full_dataset):
    """GaussianTalker (untrained, 1500 Gaussians) at 64^2 and at 128^2 area-averaged to 64^2: the same image,
    so the render size only changes the sampling (K scaled with the backdrop), not the framing."""
    from test_gaussiantalker import _tiny_config

    from talkinghead.data import PreparedDataset
    from talkinghead.methods import get_method
    from talkinghead.methods.data import dataset_info

    cfg = _tiny_config(10)
    ds = PreparedDataset(full_dataset, size=64)
    model = get_method("gaussiantalker").build(cfg, dataset_info(ds, 64), dataset=ds)
    with torch.no_grad():
        small = model.render(Conditions(full_dataset, 64, cfg.data.audio_radius)(3))
        big = model.render(Conditions(full_dataset, 128, cfg.data.audio_radius)(3))
    assert big.shape == (128, 128, 3)
    down = torch.nn.functional.avg_pool2d(big.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
    backdrop = Conditions(full_dataset, 64, 2)(3).backdrop
    head = (small - backdrop).abs().mean()  # the (faint, untrained) head over the backdrop
    assert head > 0.01 and (down - small).abs().mean() < 0.2 * head  # a K not scaled would move it


def test_low_pass_sets_the_screen_space_dilation_of_every_gaussian():
    """A near-point Gaussian's splat has the low-pass as its 2D variance: its summed alpha (an area: the same
    profile, cut at the same alpha) grows 4x from 4.8 to 19.2 px^2, on both CPU compositors; the default is
    3DGS's 0.3, and low_pass(s) is 0.3 s^2 above the training size."""
    from talkinghead.render import EPS2D, low_pass, rasterize

    args = (torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 1e-6),
            torch.tensor([0.02]), torch.ones(1, 3), torch.eye(4), torch.tensor([[50.0, 0, 32], [0, 50, 32], [0, 0, 1]]),
            64, 64)
    for backend in ("torch", "numba"):
        sums = [float(rasterize(*args, backend=backend, eps2d=eps)[1].sum()) for eps in (4.8, 19.2)]
        np.testing.assert_allclose(sums[1] / sums[0], 4.0, rtol=0.05)
        default = float(rasterize(*args, backend=backend)[1].sum())
        assert default == float(rasterize(*args, backend=backend, eps2d=EPS2D)[1].sum()) < sums[0]
    assert EPS2D == 0.3 and low_pass(0.5) == low_pass(1.0) == 0.3 and low_pass(4.0) == pytest.approx(4.8)


def test_render_condition_passes_the_scaled_low_pass_in_the_condition():
    """The renderer's only low-pass channel is the Condition: 0.3 px^2 at the training size, 0.3 * 4^2 at 4x."""
    from talkinghead.methods.render import render_condition

    seen = []

    class Spy:
        def render(self, cond):
            seen.append(cond.eps2d)
            return cond.backdrop

    for side in (64, 256):
        cond = Condition(viewmat=torch.eye(4), K=torch.eye(3), backdrop=torch.zeros(side, side, 3),
                         audio=torch.zeros(3, 2), blink=torch.zeros(2))
        render_condition(Spy(), cond, 64)
        assert cond.eps2d == 0.3  # the caller's Condition is left as it was
    assert seen == [0.3, pytest.approx(4.8)]
"""What an evaluation leaves behind, and the table that compares several.

``REPORT_DIR/metrics.json``: ``{"mode", "inputs", "metrics": {name: number | "inf" | null},
"null_reasons": {name: why}, "definitions": {name: text}, "notes": [...]}``. Infinite values (PSNR of
identical frames) are written as the string ``"inf"`` so the file stays strict JSON.
``report.md``: the metrics as a table with arrows (higher/lower is better) and the reasons for nulls.
Plots (PNG): ``mouth_opening.png`` (per-frame mouth opening, prediction vs ground truth or the audio's
articulation signal), ``nose.png`` (nose-tip trajectories and their power spectra), ``psnr.png``
(per-frame PSNR), ``sync.png`` (landmark-sync score against the offset).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from talkinghead.errors import UserError

from .evaluate import METRICS, Evaluation

# The columns of the comparison table, in the order the papers' tables use.
TABLE_COLUMNS = ("psnr_face", "ssim_face", "lpips_face", "psnr_full", "ssim_full", "hairline_error", "neck_error",
                 "lmd_mouth", "lmd_all", "mouth_open_corr", "blink_error", "aue_proxy", "landmark_sync_conf", "landmark_sync_offset",
                 "syncnet_conf", "stability", "fid", "csim", "train_time_s", "render_fps")
_HEADERS = {"psnr_face": "PSNR face", "ssim_face": "SSIM face", "lpips_face": "LPIPS face",
            "psnr_full": "PSNR full", "ssim_full": "SSIM full", "hairline_error": "Hairline err",
            "neck_error": "Neck err", "lmd_mouth": "M-LMD", "lmd_all": "LMD",
            "mouth_open_corr": "Mouth r", "blink_error": "Blink err", "aue_proxy": "AUE proxy",
            "landmark_sync_conf": "LM-Sync conf", "landmark_sync_offset": "LM-Sync off",
            "syncnet_conf": "Sync", "stability": "Stability", "fid": "FID", "csim": "CSIM",
            "train_time_s": "Train time", "render_fps": "FPS"}


def _json_value(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, (np.floating, np.integer)):
        return _json_value(v.item())
    return v


def _arrow(name: str) -> str:
    d = METRICS.get(name, (0, ""))[0]
    return "↑" if d > 0 else "↓" if d < 0 else ""


def fmt(v, name: str = "") -> str:
    """A metric value for a table cell."""
    if v is None:
        return "–"
    if isinstance(v, str):
        return "∞" if v == "inf" else v
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, int) or name.endswith("offset") or name.endswith("offset_vs_gt"):
        return f"{int(v):+d}" if "offset" in name else str(v)
    if name == "train_time_s":
        return f"{v / 60:.1f} min" if v >= 60 else f"{v:.0f} s"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}"


def metrics_json(ev: Evaluation) -> dict:
    return {
        "mode": ev.mode,
        "inputs": ev.inputs,
        "metrics": {k: _json_value(v) for k, v in ev.metrics.items()},
        "null_reasons": ev.reasons,
        "definitions": {k: METRICS[k][1] for k in ev.metrics if k in METRICS},
        "notes": ev.notes,
    }


def markdown(ev: Evaluation) -> str:
    lines = [f"# Evaluation ({ev.mode})", ""]
    for k, v in ev.inputs.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| metric | value | definition |", "|---|---|---|"]
    for k in METRICS:
        if k in ev.metrics:
            lines.append(f"| {k} {_arrow(k)} | {fmt(ev.metrics[k], k)} | {METRICS[k][1]} |")
    if ev.reasons:
        lines += ["", "## Not reported", ""]
        lines += [f"- **{k}**: {why}" for k, why in ev.reasons.items()]
    if ev.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ev.notes]
    lines += ["", "Plots: mouth_opening.png, nose.png, psnr.png, sync.png; side_by_side.mp4 "
              "(ground truth | prediction | error) in self-driven mode.", ""]
    return "\n".join(lines)


def plot_all(ev: Evaluation, out: Path, fps: float) -> list[str]:
    """Write the report's PNGs into ``out``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    s = ev.series

    fig, ax = plt.subplots(figsize=(10, 3.2))
    t = np.arange(len(s["mouth_pred"])) / fps
    if "mouth_gt" in s:
        ax.plot(t, s["mouth_gt"], label="ground truth", color="black", lw=1.2)
    ax.plot(t, s["mouth_pred"], label="prediction", color="tab:red", lw=1.0)
    ax.set_ylabel("mouth opening (inner-lip gap / IOD)")
    ax.set_xlabel("time (s)")
    if "articulation" in s:
        ax2 = ax.twinx()
        ax2.plot(t[: len(s["articulation"])], s["articulation"], color="tab:blue", lw=0.6, alpha=0.5,
                 label="audio articulation")
        ax2.set_ylabel("audio articulation (std units)", color="tab:blue")
    r = ev.metrics.get("mouth_open_corr")
    ax.set_title("mouth opening" + (f" (r = {r:.3f})" if isinstance(r, float) else ""))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mouth_opening.png", dpi=110)
    plt.close(fig)
    written.append("mouth_opening.png")

    if "nose_pred" in s:
        from .stability import HIGH_FREQ_HZ, power_spectrum

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        tt = np.arange(len(s["nose_pred"])) / fps
        for j, axis in enumerate("xy"):
            axes[j].plot(tt, s["nose_ref"][:, j], color="black", lw=1.2, label="reference")
            axes[j].plot(tt, s["nose_pred"][:, j], color="tab:red", lw=0.9, label="prediction")
            axes[j].set_title(f"nose tip {axis} (px)")
            axes[j].set_xlabel("time (s)")
        axes[0].legend(fontsize=8)
        for key, color, label in (("nose_ref", "black", "reference"), ("nose_pred", "tab:red", "prediction")):
            f, p = power_spectrum(s[key][:, None, :], fps)
            axes[2].semilogy(f[1:], p[1:] + 1e-12, color=color, lw=1.0, label=label)
        axes[2].axvline(HIGH_FREQ_HZ, color="gray", ls="--", lw=0.8)
        st = ev.metrics.get("stability")
        axes[2].set_title("nose-tip power spectrum" + (f" (stability {st:.3f})" if isinstance(st, float) else ""))
        axes[2].set_xlabel("Hz (dashed: high-frequency cut)")
        fig.tight_layout()
        fig.savefig(out / "nose.png", dpi=110)
        plt.close(fig)
        written.append("nose.png")

    if "psnr_full" in s:
        fig, ax = plt.subplots(figsize=(10, 3.2))
        tp = np.arange(len(s["psnr_full"])) / fps
        for key, color in (("psnr_face", "tab:red"), ("psnr_full", "tab:gray")):
            vals = np.where(np.isinf(s[key]), np.nan, s[key])
            ax.plot(tp, vals, color=color, lw=1.0, label=key.replace("_", " "))
        if np.isinf(s["psnr_full"]).all():
            ax.text(0.5, 0.5, "identical frames: PSNR = inf", transform=ax.transAxes, ha="center")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("PSNR (dB)")
        ax.legend(fontsize=8)
        ax.set_title("per-frame PSNR")
        fig.tight_layout()
        fig.savefig(out / "psnr.png", dpi=110)
        plt.close(fig)
        written.append("psnr.png")

    if "sync_scores" in s:
        from .sync import MAX_OFFSET, NATURAL_LAG_S

        fig, ax = plt.subplots(figsize=(6, 3.2))
        k = np.arange(-MAX_OFFSET, MAX_OFFSET + 1) - int(round(NATURAL_LAG_S * fps))
        ax.plot(k, s["sync_scores"], "o-", color="tab:red", ms=3, label="prediction")
        if "sync_scores_gt" in s:
            ax.plot(k, s["sync_scores_gt"], "o-", color="black", ms=3, label="ground truth")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_xlabel("audio offset (frames, + = audio late)")
        ax.set_ylabel("mouth x articulation score")
        ax.set_title(f"landmark sync: offset {ev.metrics.get('landmark_sync_offset')}, "
                     f"conf {ev.metrics.get('landmark_sync_conf', 0):.3f}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "sync.png", dpi=110)
        plt.close(fig)
        written.append("sync.png")
    return written


def write_report(ev: Evaluation, out: Path, fps: float) -> None:
    """metrics.json, report.md and the plots into the folder ``out`` (which exists)."""
    (out / "metrics.json").write_text(json.dumps(metrics_json(ev), indent=2) + "\n")
    (out / "report.md").write_text(markdown(ev))
    plot_all(ev, out, fps)


def read_metrics(report_dir: str | os.PathLike) -> dict:
    path = Path(report_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{report_dir}: not an evaluation report (no metrics.json; run talkinghead eval)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable metrics.json ({exc})") from None


def comparison_table(reports: dict[str, dict]) -> str:
    """Markdown tables, one per setting (self-driven, cross-driven) as in the papers: one row per run
    (name -> metrics.json content), metric columns with arrows, the best value of each column in bold."""
    parts = []
    for mode in ("self-driven", "cross-driven"):
        group = {k: r for k, r in reports.items() if r.get("mode") == mode}
        if group:
            parts += [f"### {mode.capitalize()}", "", _table(group), ""]
    parts += ["↑ higher is better, ↓ lower is better; – not available (each run's metrics.json says why). "
              "PSNR/SSIM/LPIPS face = on the face mask; Hairline/Neck err = mean absolute error (0-255) in a "
              "band around the hair-face boundary / along the jaw line over the neck; M-LMD/LMD in pixels at "
              "512 px width; Stability per GaussianFlameTalk sec. 3.3; LM-Sync = landmark sync (mouth opening vs audio articulation, not "
              "SyncNet), offset in frames (+ = audio late); Sync = SyncNet confidence.", ""]
    return "\n".join(parts)


def _table(reports: dict[str, dict]) -> str:
    present = [c for c in TABLE_COLUMNS if any(r["metrics"].get(c) is not None for r in reports.values())]
    head = "| Method | " + " | ".join(f"{_HEADERS[c]} {_arrow(c)}".strip() for c in present) + " |"
    lines = [head, "|---|" + "---|" * len(present)]
    best = {}
    for c in present:
        d = METRICS[c][0]
        vals = [v for r in reports.values() if (v := _num(r["metrics"].get(c))) is not None]
        if d and len(vals) > 1:
            best[c] = max(vals) if d > 0 else min(vals)
    for name, r in reports.items():
        cells = []
        for c in present:
            v = r["metrics"].get(c)
            cell = fmt(v, c)
            if c in best and _num(v) == best[c]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v) -> float | None:
    if v == "inf":
        return math.inf
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

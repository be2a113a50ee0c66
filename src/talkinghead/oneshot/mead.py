"""Reader of MEAD's folder layout: emotion-labelled clips for training the emotion mapper M_e.

MEAD (Wang et al. 2020, the paper's training data) ships one folder per actor::

    ROOT/M003/video/front/happy/level_2/001.mp4
    ROOT/<actor>/video/<view>/<emotion>/level_<1-3>/<clip>.mp4

``neutral`` has a single level. The mapper trains on *prepared* datasets (``talkinghead prepare``) of such
clips; :func:`scan_mead` finds every clip and, for each, the prepared dataset beside it: a folder with the
clip's stem next to the mp4 (``.../level_2/001/meta.json``) or ``PREPARED/<actor>_<view>_<emotion>_level_<n>_<clip>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from talkinghead.data import is_dataset
from talkinghead.errors import UserError

from .emotion import EMOTIONS

_LEVEL = re.compile(r"level_(\d+)$")


@dataclass(frozen=True)
class MeadClip:
    actor: str
    view: str
    emotion: str
    level: int
    video: Path
    prepared: Path | None  # the prepared dataset of the clip, when there is one

    @property
    def key(self) -> str:
        return f"{self.actor}_{self.view}_{self.emotion}_level_{self.level}_{self.video.stem}"


def scan_mead(root: str | Path, prepared_root: str | Path | None = None, view: str | None = "front") -> list[MeadClip]:
    """Every clip under a MEAD ``root`` (only ``view``'s camera unless None), sorted; UserError when none."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder (expected MEAD's layout ACTOR/video/VIEW/EMOTION/level_N/*.mp4)")
    clips = []
    for mp4 in sorted(root.glob("*/video/*/*/level_*/*.mp4")):
        level_dir, emotion_dir, view_dir, actor_dir = mp4.parent, mp4.parent.parent, mp4.parents[2], mp4.parents[4]
        m = _LEVEL.match(level_dir.name)
        if not m or emotion_dir.name not in EMOTIONS or (view and view_dir.name != view):
            continue
        clip = MeadClip(actor_dir.name, view_dir.name, emotion_dir.name, int(m.group(1)), mp4, None)
        for cand in (mp4.with_suffix(""), Path(prepared_root) / clip.key if prepared_root else None):
            if cand is not None and is_dataset(cand):
                clip = MeadClip(clip.actor, clip.view, clip.emotion, clip.level, mp4, cand)
                break
        clips.append(clip)
    if not clips:
        raise UserError(f"no MEAD clips under {root} (expected ACTOR/video/{view or 'VIEW'}/EMOTION/level_N/*.mp4)")
    return clips

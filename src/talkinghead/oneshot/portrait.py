"""One portrait -> what the model needs: the crop, its camera, its coefficients and its backdrop.

The same steps ``prepare`` runs on a clip, on a single frame, through the same code: mediapipe's face mesh
(:class:`talkinghead.face.landmarks.FaceMesh`, still-image mode, up to four faces so that a second person is
noticed), the clip crop (:func:`talkinghead.prepare.crop.fixed_crop`), the pinhole camera of the clip
intrinsics and a PnP head pose (:mod:`talkinghead.prepare.pose`, with the shared space's mean face as the
rigid template, since one image has no template of its own), the head-frame mesh lifted onto the landmark
rays and fitted in the shared expression space (:meth:`ExpressionSpace.fit_mesh`), and the backdrop
(background + torso, head removed) from prepare's person segmentation, parsing, plate and torso steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from talkinghead.errors import UserError

WORK_SIZE = 512  # crop side the tracking and masks run at (prepare's default), before resizing to the model
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Portrait:
    image: np.ndarray  # [S, S, 3] float32 in [0, 1], the crop at the model's size
    backdrop: np.ndarray  # [S, S, 3] float32, head removed
    landmarks: np.ndarray  # [478, 3] in pixels of the crop at size S
    viewmat: np.ndarray  # [4, 4] head frame -> camera
    K: np.ndarray  # [3, 3] at size S
    coefficients: np.ndarray  # [K] in the shared expression space


def read_first_frame(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file, or of a video's first frame."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError):
            raise UserError(f"cannot read image {path}") from None
    from talkinghead import media

    try:
        frame = next(iter(media.iter_frames(path, media.probe(path).avg_fps or 25.0)), None)
    except UserError:
        raise
    except Exception:
        raise UserError(f"cannot read {path} as an image or a video") from None
    if frame is None:
        raise UserError(f"{path} has no video frames")
    return frame


def detect_one_face(image: np.ndarray, what: str) -> np.ndarray:
    """Landmarks [478, 3] of the one face in ``image``; UserError for none or several."""
    from talkinghead.face.landmarks import FaceMesh, quiet_native_stderr

    with quiet_native_stderr(), FaceMesh(max_faces=4, video_mode=False) as mesh:
        faces = mesh.detect(image)
    if not faces:
        raise UserError(f"no face found in {what}")
    if len(faces) > 1:
        raise UserError(f"{len(faces)} faces found in {what}; give a portrait of one person (crop it)")
    return faces[0]


def load_portrait(path: Path, space, size: int, fov_deg: float = 24.0, crop: bool = True) -> Portrait:
    """The :class:`Portrait` of an image or video file for a model of output side ``size``.

    ``crop=False`` takes a square image as it is (a frame of a prepared dataset, already cropped)."""
    from talkinghead.prepare import masks, pose
    from talkinghead.prepare.crop import Crop, fixed_crop

    frame = read_first_frame(path)
    lm_src = detect_one_face(frame, str(path))
    if crop:
        window = fixed_crop(lm_src[None], frame.shape[1], frame.shape[0])
    elif frame.shape[0] == frame.shape[1]:
        window = Crop(0, 0, frame.shape[0])
    else:
        raise UserError(f"{path} is not square; it needs the portrait crop")
    work = window.apply(frame, WORK_SIZE)
    lm = window.to_crop_pixels(lm_src, WORK_SIZE)
    K_work = pose.clip_intrinsics(WORK_SIZE, fov_deg)
    template = space.mean_neutral
    viewmat = pose.estimate_poses(lm[None], template, K_work, 0)[0]
    mesh = pose.lift_to_head(lm[None], pose.align_to_template(lm[None], template), viewmat[None], K_work)[0]
    coefficients = space.fit_mesh(mesh)
    person = masks.segment_person(work[None])
    parsing = masks.parse_frames(work[None], lm[None], person)
    plate = masks.background_plate(work[None], parsing)
    torso = masks.torso_images(work[None], parsing, plate)[0]
    s = size / WORK_SIZE
    K = K_work.copy()
    K[:2] *= s
    return Portrait(image=_resize(work, size), backdrop=_resize(torso, size), landmarks=(lm * np.float32(s)),
                    viewmat=viewmat.astype(np.float32), K=K.astype(np.float32), coefficients=coefficients)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(np.asarray(image, np.uint8))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BOX if im.size[0] > size else Image.BILINEAR)
    return np.asarray(im, np.float32) / 255.0

"""COLMAP through pycolmap: a database from hloc's h5 files, verification, incremental mapping, a picture.

The database is built under a temporary name (cameras and images by pycolmap's own importer, which
reads EXIF focal lengths; keypoints and matches from the h5 files; two-view geometries from
pycolmap's verification) and renamed into place, so a crash never leaves a half-written database.
The model is written the same way: into a temporary folder, renamed to OUT/sfm.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .atomic import atomic_path
from .errors import MatchrtError
from .pairs import Pair

# COLMAP's RANSAC and mapper are unseeded by default (random_seed -1): on 2 cores three mappings of
# one database of the ten Sacre Coeur images gave 1102 to 1821 points, and one CI run 339. Seeded,
# the same matches give the same database, and the mapping varies only with the order its threads
# finish in (1723 to 1951 points); pass another random_seed in the options for another draw.
SEED = 0
# pycolmap's verification defaults, with hloc's RANSAC settings for learned matches (more trials,
# a lower inlier ratio than SIFT needs)
VERIFY_DEFAULTS: dict[str, Any] = {"ransac": {"max_num_trials": 20000, "min_inlier_ratio": 0.1, "random_seed": SEED}}
MAPPING_DEFAULTS: dict[str, Any] = {"random_seed": SEED}


def require_pycolmap():  # -> module
    # OpenCV first: loaded after pycolmap's wheel, cv2.imwrite's PNG encoder frees memory with the
    # wrong allocator and aborts the process (pycolmap 4.2.1 with opencv-python-headless 4.x)
    import cv2  # noqa: F401

    try:
        import pycolmap
    except ImportError:
        raise MatchrtError("COLMAP output needs pycolmap: pip install 'matchrt[sfm]'") from None
    return pycolmap


@contextmanager
def quiet(pycolmap: Any, verbose: bool = False) -> Iterator[None]:
    """COLMAP logs at INFO to stderr; keep warnings and errors only unless verbose."""
    old = pycolmap.logging.minloglevel
    if not verbose:
        pycolmap.logging.minloglevel = 2
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = old


def _options(cls: Any, values: dict[str, Any]) -> Any:
    """A pycolmap options object with nested fields set from a dict."""
    obj = cls()
    for key, value in values.items():
        if isinstance(value, dict):
            sub = getattr(obj, key)
            for k, v in value.items():
                setattr(sub, k, v)
        else:
            setattr(obj, key, value)
    return obj


def write_database(db_path: Path, image_dir: Path, features: Path, matches: Path,
                   pairs: Sequence[Pair], camera_mode: str = "AUTO",
                   verify: Optional[dict[str, Any]] = None, verbose: bool = False) -> dict[str, Any]:
    """Build the database beside `db_path` and rename it into place; returns counts."""
    pycolmap = require_pycolmap()
    from .features_h5 import read_matches, require_h5py

    db_path = Path(db_path)
    names = list(dict.fromkeys(n for p in pairs for n in p))
    counts: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)  # a killed run's leftover under the same name: COLMAP would add to it
        with quiet(pycolmap, verbose):
            pycolmap.Database.open(tmp).close()
            pycolmap.import_images(tmp, Path(image_dir), getattr(pycolmap.CameraMode, camera_mode.upper()),
                                   image_names=names)
            h5py = require_h5py()
            with pycolmap.Database.open(tmp) as db:
                ids = {im.name: im.image_id for im in db.read_all_images()}
                missing = [n for n in names if n not in ids]
                if missing:
                    raise MatchrtError(f"COLMAP could not import {len(missing)} image(s): {missing[:3]}")
                with h5py.File(features, "r") as f:
                    for name in names:
                        kp = f[name]["keypoints"][()].astype(np.float64) + 0.5  # COLMAP: corner origin
                        db.write_keypoints(ids[name], kp.astype(np.float32))
                for a, b in pairs:
                    rows, _ = read_matches(matches, a, b)
                    db.write_matches(ids[a], ids[b], rows.astype(np.uint32))
            with tempfile.TemporaryDirectory() as td:
                pairs_file = Path(td) / "pairs.txt"
                pairs_file.write_text("".join(f"{a} {b}\n" for a, b in pairs))
                options = _options(pycolmap.TwoViewGeometryOptions, {**VERIFY_DEFAULTS, **(verify or {})})
                pycolmap.verify_matches(tmp, pairs_file, options=options)
            with pycolmap.Database.open(tmp) as db:
                counts.update({"images": db.num_images(), "cameras": db.num_cameras(),
                               "keypoints": db.num_keypoints(), "matched_pairs": db.num_matched_image_pairs(),
                               "matches": db.num_matches(), "verified_pairs": db.num_verified_image_pairs(),
                               "inlier_matches": db.num_inlier_matches()})

    atomic_path(db_path, build)
    return dict(counts, path=str(db_path))


def reconstruction_stats(rec: Any, num_images: int) -> dict[str, Any]:
    return {
        "registered_images": rec.num_reg_images(), "input_images": num_images,
        "points": rec.num_points3D(),
        "mean_track_length": round(float(rec.compute_mean_track_length()), 4),
        "mean_reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 4),
        "observations": rec.compute_num_observations(),
    }


def reconstruct(db_path: Path, image_dir: Path, out_dir: Path, options: Optional[dict[str, Any]] = None,
                verbose: bool = False) -> dict[str, Any]:
    """Incremental mapping of the database; the largest model goes to `out_dir` (COLMAP binary files)
    with stats.json and reconstruction.png. Returns the stats."""
    pycolmap = require_pycolmap()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with pycolmap.Database.open(db_path) as db:
        num_images = db.num_images()
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        opts = _options(pycolmap.IncrementalPipelineOptions,
                        {"num_threads": min(os.cpu_count() or 1, 16), **MAPPING_DEFAULTS, **(options or {})})
        with quiet(pycolmap, verbose):
            models = pycolmap.incremental_mapping(db_path, image_dir, work / "models", options=opts)
        if not models:
            raise MatchrtError("COLMAP reconstructed no model: too few verified matches (see the "
                               "colmap counts in summary.json)")
        best = max(models.values(), key=lambda r: r.num_reg_images())
        model_dir = work / "model"
        model_dir.mkdir()
        best.write(model_dir)
        stats = dict(reconstruction_stats(best, num_images), models=len(models))
        (model_dir / "stats.json").write_text(json.dumps(stats, indent=1))
        plot_reconstruction(best, model_dir / "reconstruction.png", stats)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(model_dir, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(stats, path=str(out_dir))


def plot_reconstruction(rec: Any, path: Path, stats: Optional[dict[str, Any]] = None,
                        size: int = 900) -> Path:
    """Top view (looking down the cameras' mean up direction): points in their colours, cameras as
    red triangles pointing where they look."""
    import cv2

    from .viz import save_png

    images = [rec.images[i] for i in rec.reg_image_ids()]
    centres = np.array([im.projection_center() for im in images])
    views = np.array([im.viewing_direction() for im in images])
    # image y points down, so a camera's up in the world is minus its rotation's second row
    up = -np.mean([im.cam_from_world().rotation.matrix()[1] for im in images], axis=0)
    up /= np.linalg.norm(up) + 1e-12
    forward = views.mean(0) - up * float(views.mean(0) @ up)
    if np.linalg.norm(forward) < 1e-6:
        forward = np.cross(up, [1.0, 0.0, 0.0])
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    pts = np.array([p.xyz for p in rec.points3D.values()]).reshape(-1, 3)
    cols = np.array([p.color for p in rec.points3D.values()], np.uint8).reshape(-1, 3)

    def plane(x: np.ndarray) -> np.ndarray:  # (right, forward) coordinates, forward up the picture
        return np.stack([x @ right, -(x @ forward)], -1)

    p2, c2 = plane(pts), plane(centres)
    both = np.concatenate([p2, c2]) if len(p2) else c2
    lo = np.percentile(both, 1, axis=0) if len(p2) else both.min(0)
    hi = np.percentile(both, 99, axis=0) if len(p2) else both.max(0)
    lo, hi = np.minimum(lo, c2.min(0)), np.maximum(hi, c2.max(0))
    margin, top = 40, 50
    scale = (size - 2 * margin) / max(float((hi - lo).max()), 1e-9)
    centre = (lo + hi) / 2
    canvas = np.full((size + top, size, 3), 255, np.uint8)

    def pix(x: np.ndarray) -> np.ndarray:  # the content centred in the square below the title
        return np.round((x - centre) * scale + [size / 2, top + size / 2]).astype(np.int64)

    pp = pix(p2)
    inside = (pp[:, 0] >= 0) & (pp[:, 0] < size) & (pp[:, 1] >= top) & (pp[:, 1] < size + top)
    for (x, y), c in zip(pp[inside], cols[inside]):
        cv2.circle(canvas, (int(x), int(y)), 2, (int(c[2]), int(c[1]), int(c[0])), -1)
    arrow = 0.04 * size
    for c, v in zip(pix(c2), views):  # a frustum: apex at the camera, opening where it looks
        d = plane(v[None])[0]
        d = d / (np.linalg.norm(d) + 1e-12)
        n = np.array([-d[1], d[0]])
        far = c + d * arrow
        tri = np.array([c, far + n * arrow * 0.5, far - n * arrow * 0.5]).astype(np.int32)
        cv2.polylines(canvas, [tri], True, (30, 30, 220), 2, cv2.LINE_AA)
    title = "COLMAP model, top view"
    if stats:
        title += (f": {stats['registered_images']}/{stats['input_images']} images, "
                  f"{stats['points']} points, track {stats['mean_track_length']:.2f}, "
                  f"reproj. {stats['mean_reprojection_error_px']:.2f} px")
    cv2.putText(canvas, title, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return save_png(canvas, path)

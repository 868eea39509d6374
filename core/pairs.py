"""Pair lists in hloc's format: which image pairs to match, and how hloc names a pair in its h5 files.

A pairs file holds one `name0 name1` per line, names relative to the image folder (blank lines and
`#` comments are skipped). hloc stores a pair's matches under the group `name0/name1`, with any `/`
inside a name replaced by `-`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from .atomic import atomic_text
from .errors import MatchrtError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}

Pair = tuple[str, str]


def list_images(image_dir: Path) -> list[str]:
    """Image files under `image_dir` (recursively), as sorted POSIX paths relative to it."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise MatchrtError(f"image folder not found: {image_dir}")
    names = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise MatchrtError(f"{image_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return names


def pair_key(name0: str, name1: str) -> str:
    """The h5 group of a pair in hloc's matches files."""
    return "/".join((name0.replace("/", "-"), name1.replace("/", "-")))


def read_pairs(path: Path) -> list[Pair]:
    """Pairs from an hloc pairs file; a malformed line is an error naming its number."""
    path = Path(path)
    if not path.is_file():
        raise MatchrtError(f"pairs file not found: {path}")
    pairs: list[Pair] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise MatchrtError(f"{path}:{number}: expected `name0 name1`, got {line!r}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise MatchrtError(f"{path} lists no pairs")
    return pairs


def write_pairs(pairs: Iterable[Pair], path: Path) -> Path:
    """Write an hloc pairs file under a temporary name, then rename it into place."""
    return atomic_text(path, "".join(f"{a} {b}\n" for a, b in pairs))


def exhaustive_pairs(names: Sequence[str]) -> list[Pair]:
    """Every unordered pair once: (i, j) for i < j in the given order."""
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential_pairs(names: Sequence[str], overlap: int) -> list[Pair]:
    """Each image with the `overlap` images after it (video frames, ordered captures)."""
    if overlap < 1:
        raise MatchrtError(f"--sequential needs a window of at least 1 image, got {overlap}")
    return [(names[i], names[j]) for i in range(len(names))
            for j in range(i + 1, min(len(names), i + 1 + overlap))]


def unique_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Drop self-pairs and repeats ((b, a) repeats (a, b)), keeping the first order seen."""
    seen: set[frozenset[str]] = set()
    out: list[Pair] = []
    for a, b in pairs:
        key = frozenset((a, b))
        if a == b or key in seen:
            continue
        seen.add(key)
        out.append((a, b))
    return out


def check_images_exist(pairs: Sequence[Pair], image_dir: Path) -> list[str]:
    """The images the pairs name, in first-seen order; a missing one is an error naming it."""
    names = list(dict.fromkeys(n for p in pairs for n in p))
    missing = [n for n in names if not (Path(image_dir) / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MatchrtError(f"{len(missing)} image(s) of the pair list are not in {image_dir}: {shown}. "
                           "Names in a pairs file are relative to IMAGE_DIR.")
    return names

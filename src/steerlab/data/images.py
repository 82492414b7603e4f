"""Image sets stored as a tar.gz of JPEG/PNG files (each possibly gzipped itself), decoded with Pillow.

`read_image_archive` reads any such archive into a float tensor (n, 3, size, size) in [0, 1];
`read_happyfaces` adds the two labels of the HappyFaces benchmark (Aligned AI 2022), whose files are named
`<person>_<nnnn>_<TAG>.jpg[.gz]` with TAG in FHWH, FHWS, FSWH, FSWS (FH/FS: the face is happy / sad;
WH/WS: the red writing says "HAPPY" / "SAD").
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlab.data.errors import DataFormatError, check_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HAPPYFACES_TAGS = ("FHWH", "FHWS", "FSWH", "FSWS")


@dataclass
class ImageSet:
    """`images` (n, 3, size, size) float32 in [0, 1]; `names` the archive members, in sorted order."""

    images: torch.Tensor
    names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class LabelledFaces(ImageSet):
    """HappyFaces images with `face` (1 = happy face) and `text` (1 = writing "HAPPY") labels, and tags."""

    face: torch.Tensor
    text: torch.Tensor
    tags: list[str]


def _decode(data: bytes, archive: Path, member: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if member.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise DataFormatError(archive, f"member {member}: not valid gzip data ({error})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BOX)
            raw = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataFormatError(archive, f"member {member}: not a readable image ({error})") from None
    return raw.view(size, size, 3).permute(2, 0, 1).float() / 255.0


def read_image_archive(path: str | os.PathLike, size: int = 32, option: str | None = None) -> ImageSet:
    """Every image member (.jpg/.jpeg/.png, optionally .gz-compressed) of the tar(.gz) at `path`, resized
    to `size` x `size` RGB (box filter), sorted by member name. A missing file, an unreadable or truncated
    archive, a member that does not decode, or an archive without images is a `DataFormatError` naming
    the file (and the member)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, not {size}")
    path = check_file(path, option)
    images, names = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted(
                (
                    m
                    for m in tar.getmembers()
                    if m.isfile() and m.name.lower().removesuffix(".gz").endswith(IMAGE_SUFFIXES)
                ),
                key=lambda m: m.name,
            )
            for m in members:
                handle = tar.extractfile(m)
                images.append(_decode(handle.read(), path, m.name, size))
                names.append(m.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataFormatError(path, f"not a readable tar archive ({type(error).__name__}: {error})") from None
    if not images:
        raise DataFormatError(
            path, f"no image files ({', '.join(IMAGE_SUFFIXES)}, optionally .gz) in the archive"
        )
    return ImageSet(torch.stack(images), names, str(path))


def read_happyfaces(path: str | os.PathLike, size: int = 32, option: str | None = None) -> LabelledFaces:
    """A HappyFaces archive (labeled_sets.tar.gz, validation_sets.tar.gz) with both labels from each file
    name's tag; a member without one of the tags FHWH, FHWS, FSWH, FSWS is a `DataFormatError`."""
    images = read_image_archive(path, size, option)
    tags = []
    for name in images.names:
        stem = Path(name.removesuffix(".gz")).stem
        match = re.search(r"_(F[HS]W[HS])$", stem)
        if match is None:
            raise DataFormatError(
                images.source,
                f"member {name}: the file name does not end in a tag ({', '.join(HAPPYFACES_TAGS)})",
            )
        tags.append(match.group(1))
    face = torch.tensor([t[1] == "H" for t in tags], dtype=torch.long)
    text = torch.tensor([t[3] == "H" for t in tags], dtype=torch.long)
    return LabelledFaces(images.images, images.names, images.source, face, text, tags)

"""The apex pack's compressed extension: `compress SO DEST.xz` (scripts/build_apex_group_norm.sh) and
`unpack SITE DEST_DIR` (tests/gpu/session.sh, and the build's --check-import, which then imports it).

The extension's ~75 MB of sm_90 kernels do not fit the 64 MiB a device call carries, so the pack holds it as
`SITE/NAME.so.xz` and the GPU machine unpacks it into DEST_DIR, outside the pack (the pack must stay small to travel
again). Stdlib only: it runs with the GPU image's Python. Unpacking writes `NAME.so.part` and renames it when
complete; a file already unpacked and newer than its .xz is kept (a warm machine).
"""

from __future__ import annotations

import lzma
import shutil
import sys
from pathlib import Path


def compress(source: Path, dest: Path) -> None:
    """xz `source` into `dest` (the strongest preset: packed once, carried many times)."""
    with open(source, "rb") as src, lzma.open(dest, "wb", preset=9 | lzma.PRESET_EXTREME) as dst:
        shutil.copyfileobj(src, dst)


def unpack(site: Path, dest_dir: Path) -> list[Path]:
    """Every `site/*.so.xz` into `dest_dir` (skipping those unpacked already); returns the extension files."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    unpacked = []
    for packed in sorted(site.glob("*.so.xz")):
        target = dest_dir / packed.name.removesuffix(".xz")
        if not (target.is_file() and target.stat().st_mtime > packed.stat().st_mtime):
            part = target.with_name(target.name + ".part")
            with lzma.open(packed) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.replace(target)
        unpacked.append(target)
    return unpacked


def main(argv: list[str]) -> int:
    """`compress SO DEST.xz` or `unpack SITE DEST_DIR`."""
    if len(argv) == 3 and argv[0] == "compress":
        compress(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "unpack":
        unpack(Path(argv[1]), Path(argv[2]))
    else:
        print("usage: apex_pack.py compress SO DEST.xz | unpack SITE DEST_DIR", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Rebuild data/moby_dick.txt: Moby Dick (Herman Melville, 1851; public domain), the out-of-domain text.

The text ships as R lazy-load data in Debian's r-cran-tokenizers package; this script reads it without R through
PyPI `rdata`, keeps chapters 1-135 and the Epilogue (no front matter, no distributor's header or licence), and
reflows each paragraph onto one line (paragraphs separated by a blank line):

    pip install rdata && python data/make_moby_dick.py            # runs `apt-get download r-cran-tokenizers`
    python data/make_moby_dick.py --deb r-cran-tokenizers_0.3.0-1_amd64.deb
"""
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from debian_text import build_text_file

RDB = "usr/lib/R/site-library/tokenizers/data/Rdata.rdb"


def read_mobydick(deb: Path) -> str:
    """The `mobydick` object of the package's lazy-load database: its only entry, a zlib-compressed R string."""
    import rdata
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        blob = (Path(tmp) / RDB).read_bytes()
    size = struct.unpack(">I", blob[:4])[0]        # each entry: uncompressed length, then a zlib stream
    raw = zlib.decompress(blob[4:])
    assert len(raw) == size, f"{RDB}: {len(raw)} bytes unpacked, {size} announced"
    return str(rdata.conversion.convert(rdata.parser.parse_data(raw))[0])


def chapters_only(text: str) -> str:
    """Chapters 1-135 and the Epilogue, each paragraph on one line."""
    start = text.index("\nCHAPTER 1. Loomings.")
    end = text.index("End of Project Gutenberg")
    paragraphs = re.split(r"\n\s*\n", text[start:end].replace("\r", ""))
    lines = [" ".join(p.split()) for p in paragraphs if p.strip()]
    assert sum(1 for p in lines if re.match(r"CHAPTER \d+\. ", p)) == 135 and "Epilogue" in lines
    return "\n\n".join(lines) + "\n"


def main() -> None:
    build_text_file(__doc__, "r-cran-tokenizers", "moby_dick.txt", lambda deb: chapters_only(read_mobydick(deb)))


if __name__ == "__main__":
    main()

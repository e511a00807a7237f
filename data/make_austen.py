"""Rebuild data/austen.txt: Pride and Prejudice (1813) and Emma (1815) by Jane Austen (public domain), a training text.

A third text, neither the calibration domain (Wikipedia lead sections) nor the out-of-domain test text (Moby Dick):
post-training may mix it in (`--train-data wiki-offline+austen`) so that distillation does not only restore the
calibration domain. No run evaluates on it. The novels ship as R lazy-load data in Debian's r-cran-janeaustenr
package (one string per printed line); this script reads them without R through PyPI `rdata`, drops the title
pages, and reflows each paragraph onto one line (paragraphs separated by a blank line; chapter headings as
"PRIDE AND PREJUDICE CHAPTER 1" / "EMMA VOLUME I CHAPTER I"):

    pip install rdata && python data/make_austen.py               # runs `apt-get download r-cran-janeaustenr`
    python data/make_austen.py --deb r-cran-janeaustenr_1.0.0-1_all.deb
"""
import gzip
import re
import subprocess
import tempfile
import zlib
from pathlib import Path

from debian_text import build_text_file

DATA = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = {"prideprejudice": "PRIDE AND PREJUDICE", "emma": "EMMA"}


def read_novels(deb: Path) -> dict[str, list[str]]:
    """The novels' line vectors from the package's lazy-load database (index: gzip; entries: length + zlib)."""
    import rdata

    def load(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        index = load(gzip.decompress((Path(tmp) / DATA / "Rdata.rdx").read_bytes()))["variables"]
        blob = (Path(tmp) / DATA / "Rdata.rdb").read_bytes()
    novels = {}
    for name in NOVELS:
        offset, length = (int(x) for x in index[name])
        novels[name] = [str(line) for line in load(zlib.decompress(blob[offset + 4:offset + length]))]
    return novels


def paragraphs(name: str, lines: list[str]) -> list[str]:
    """The novel from its first chapter on, one paragraph a line; headings carry the novel's title."""
    text = "\n".join(lines)
    start = re.search(r"^(VOLUME I\n+)?Chapter 1$|^(VOLUME I\n+)?CHAPTER I$", text, re.M | re.I).start()
    out, volume = [], ""
    for p in re.split(r"\n\s*\n", text[start:]):
        p = " ".join(p.split())
        if not p:
            continue
        if re.fullmatch(r"VOLUME [IVX]+", p):
            volume = p + " "
            continue
        if re.fullmatch(r"chapter [0-9IVXLC]+\.?", p, re.I):
            p = f"{NOVELS[name]} {volume}{p.upper().rstrip('.')}"
        out.append(p)
    return out


def both_novels(deb: Path) -> str:
    novels = read_novels(deb)
    lines = [p for name in NOVELS for p in paragraphs(name, novels[name])]
    chapters = sum(1 for p in lines if re.match(r"(PRIDE AND PREJUDICE|EMMA) .*CHAPTER ", p))
    assert chapters == 61 + 55, f"expected 61 + 55 chapters, found {chapters}"
    return "\n\n".join(lines) + "\n"


def main() -> None:
    build_text_file(__doc__, "r-cran-janeaustenr", "austen.txt", both_novels)


if __name__ == "__main__":
    main()

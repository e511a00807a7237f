"""Rebuild data/python_docs.txt: the Python 3.11 Language Reference and HOWTOs, the technical-reference domain.

Definitions, grammar and API prose with inline markup and code. The reStructuredText sources ship in Debian's
python3.11-doc (html/_sources/*.rst.txt; PSF License, a permissive licence; code examples Zero-Clause BSD). This
script keeps the reference/ and howto/ pages in file-name order, drops the `.. index::` blocks and `..` comments (index
entries for the HTML build, not prose), keeps every other line as written, and cuts each page into its top-level
sections, one unit each, headed by the page's file name and the section title (units separated by two blank lines;
data/debian_text.py's units_file):

    python data/make_python_docs.py                    # runs `apt-get download python3.11-doc`
    python data/make_python_docs.py --package python3.11-doc_3.11.2-6+deb12u8_all.deb
"""
import re
import subprocess
import tempfile
from pathlib import Path

from debian_text import build_text_file, units_file

SOURCES = "usr/share/doc/python3.11/html/_sources"
PARTS = ("reference", "howto")


def without_comments(text: str) -> str:
    """The page without `.. index::` blocks and `..` comments, at any indentation (the directive line and the lines
    indented deeper below it)."""
    out, skip_below = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_below is not None and (not line.strip() or indent > skip_below):
            continue
        skip_below = None
        body = line.strip()
        markup = body == ".." or body.startswith(".. ")
        if markup and (body.startswith(".. index::") or not re.match(r"\.\. ([\w-]+::|_|\[|\|)", body)):
            skip_below = indent             # an index block or a comment
        elif not (markup and re.fullmatch(r"\.\. _[^:]+:", body)):        # a link target alone on its line
            out.append(line)
    return "\n".join(out)


def sections(name: str, text: str) -> list[str]:
    """The page's sections at its top title level (the first underline character used), each a unit."""
    lines = text.splitlines()
    titles = [i for i in range(1, len(lines)) if re.fullmatch(r"([=*\-~^])\1{2,}", lines[i]) and lines[i - 1].strip()
              and not re.fullmatch(r"([=*\-~^])\1{2,}", lines[i - 1])]
    level = [lines[i][0] for i in titles if lines[i][0] != "*"]
    cuts = sorted({0, *(i - 1 for i in titles if level and lines[i][0] == level[0])})
    heads = [next(s for s in lines[a:b] + [name] if s.strip() and not re.fullmatch(r"([=*\-~^])\1+", s))
             for a, b in zip(cuts, cuts[1:] + [len(lines)])]
    return [f"{name}: {head.strip()}\n" + "\n".join(lines[a:b])
            for head, a, b in zip(heads, cuts, cuts[1:] + [len(lines)])]


def reference_and_howtos(deb: Path) -> str:
    units = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        for part in PARTS:
            for page in sorted((Path(tmp) / SOURCES / part).glob("*.rst.txt")):
                name = f"{part}/{page.name.removesuffix('.rst.txt')}"
                units += sections(name, without_comments(page.read_text(encoding="utf-8")))
    assert len(units) > 150, f"{len(units)} sections"
    return units_file(units)


def main() -> None:
    build_text_file(__doc__, "python3.11-doc", "python_docs.txt", reference_and_howtos)


if __name__ == "__main__":
    main()

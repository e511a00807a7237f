"""The command line both text scripts share: take a Debian package's .deb (given, or `apt-get download` it), build the
text from it, write it next to this file."""
import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Callable


def build_text_file(doc: str, package: str, out_name: str, build: Callable[[Path], str]) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--deb", type=Path, help=f"{package} .deb (default: apt-get download it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name(out_name))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
            deb = next(Path(tmp).glob(f"{package}_*.deb"))
        text = build(deb)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text):,} characters, {len(text.split()):,} words")

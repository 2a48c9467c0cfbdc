"""Text corpora: which files, read as documents, split into train and held-out by document.

One file is one document. The default corpus is the Python standard library's own source, which
every machine that runs this code already has, so training works with no download.
"""
from __future__ import annotations

import glob
import hashlib
import os

# Suffixes taken when a directory is walked; a file named explicitly is read whatever its suffix.
TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".json", ".jsonl", ".csv", ".tsv", ".xml", ".html", ".css",
    ".yaml", ".yml", ".toml", ".cfg", ".ini",
})
# Standard-library folders left out of the default corpus: third-party code, test suites (large and
# repetitive), and machine-generated tables (codec maps, pydoc's topic dump) that are not prose or code.
_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload",
    "encodings", "pydoc_data",
})  # and config-<version>-<platform>, the build's own folder


def default_corpus_files() -> list[str]:
    """The standard library's `*.py` files: its top level and its packages (see _STDLIB_SKIP_DIRS).

    Sorted by path; files that are not valid UTF-8 are skipped so every file reads the same way
    on every machine with the same Python version.
    """
    root = os.path.dirname(os.path.abspath(os.__file__))
    paths = [p for p in _walk(root, _STDLIB_SKIP_DIRS, ("config-",)) if p.endswith(".py")]
    return [p for p in paths if _is_utf8(p)]


def resolve_files(specs: list[str]) -> list[str]:
    """Files named by `specs`: a file, a directory (walked for text-like files) or a glob pattern.

    Order follows `specs`, each spec's matches sorted; repeats are dropped. A spec that matches no
    file raises FileNotFoundError naming it, so a typo never silently shrinks the corpus.
    """
    if isinstance(specs, str):  # one spec passed bare would otherwise be iterated by character
        specs = [specs]
    files: dict[str, None] = {}  # an ordered set
    for spec in specs:
        matches = _resolve_one(spec)
        if not matches:
            raise FileNotFoundError(f"corpus spec {spec!r} matches no text file")
        files.update(dict.fromkeys(matches))
    return list(files)


def _resolve_one(spec: str) -> list[str]:
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return [p for p in _walk(path) if os.path.splitext(p)[1].lower() in TEXT_SUFFIXES]
    out = []
    for match in sorted(glob.glob(path, recursive=True)):
        out.extend(_resolve_one(match) if os.path.isdir(match) else [match])
    return out


def _walk(root: str, skip_dirs: frozenset[str] = frozenset(), skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Files under `root`, sorted, leaving out hidden folders (.git and the like), `skip_dirs` and
    folders whose name starts with one of `skip_prefixes`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting keeps the walk order fixed.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs
                             and not any(d.startswith(p) for p in skip_prefixes))
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(out)


def _is_utf8(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
        return True
    except (UnicodeDecodeError, OSError):
        return False


def read_documents(files: list[str]) -> list[str]:
    """Each file's text as one document; whitespace-only files are dropped.

    Bytes that are not UTF-8 become U+FFFD rather than failing the run over one stray file.
    """
    docs = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"the corpus is empty: its {len(files)} file(s) hold no non-whitespace text")
    return docs


def split_documents(docs: list[str], heldout_fraction: float = 0.02,
                    salt: str = "") -> tuple[list[str], list[str]]:
    """(train, held-out) documents, each keeping the input order.

    A document is held out when a stable hash of its content (and `salt`) falls below
    `heldout_fraction`, so the split does not depend on file order, the machine or PYTHONHASHSEED,
    and identical documents always land on the same side (no train/held-out leakage by copies).
    Both parts are non-empty: with >= 2 documents the extreme hash is moved across if one side came
    out empty; a single document is cut by characters, its tail held out.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction = {heldout_fraction!r}: must be in (0, 1)")
    if not docs:
        raise ValueError("split_documents: no documents to split")
    if len(docs) == 1:
        return _split_one(docs[0], heldout_fraction)
    u = [_unit_hash(d, salt) for d in docs]
    held = [x < heldout_fraction for x in u]
    if not any(held):
        held[u.index(min(u))] = True
    if all(held):
        held[u.index(max(u))] = False
    train = [d for d, h in zip(docs, held) if not h]
    heldout = [d for d, h in zip(docs, held) if h]
    return train, heldout


def _split_one(doc: str, heldout_fraction: float) -> tuple[list[str], list[str]]:
    if len(doc) < 2:
        raise ValueError("split_documents: a single document needs at least 2 characters to split")
    cut = min(len(doc) - 1, max(1, round(len(doc) * heldout_fraction)))
    return [doc[:-cut]], [doc[-cut:]]


def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by the text: the first 8 bytes of its SHA-256 over 2**64."""
    digest = hashlib.sha256((salt + "\0" + text).encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64

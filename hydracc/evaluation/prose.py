"""English prose present wherever hydracc is installed: Python's reference docs and licence texts.

Decisions:
- Sources: the Python language reference topics every CPython ships for ``help()``
  (``pydoc_data.topics``: about 80 topics, 460 kB; code and grammar blocks, which are indented,
  left out), and the licence and notice files (``LICENSE*``, ``LICENCE*``, ``COPYING*``, ``NOTICE*``) that
  the installed distributions of hydracc's dependency closure ship in their metadata (torch alone
  ships about a hundred, for its third-party code), read through ``importlib.metadata``, so the
  text exists on every machine hydracc runs on (it changes with dependency versions; the result
  names the files and a digest of the text so two numbers can be checked to share their data).
  Not ``/usr/share/common-licenses``: present on Debian only, so it would make numbers machine-bound.
- Licences repeat (the same MIT or Apache text under many copyright lines), so files are first
  reduced to one per normalized text (lowercase letters only, copyright lines dropped), then
  split by file on ``crc32(the first 600 normalized letters) % HELDOUT_MOD == 0``: the variants of
  one licence, which differ in copyright lines and names, fall on the same side, so the held-out
  side is not a near copy of the calibration side; a held-out paragraph whose normalized text the
  calibration side also has (a clause shared by licences) is dropped.
- ``prose_corpus().heldout`` is what ``hydracc eval`` reads (perplexity windows and the natural
  filler of the recall tasks); ``.train`` is the only part calibration may draw from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

HELDOUT_MOD = 3
"""One document (licence family) in three is held out."""
_NAME = re.compile(r"^(licen[cs]e|copying|notice)", re.IGNORECASE)
_SKIP_SUFFIX = {".py", ".pyc", ".pyi", ".so", ".json", ".h", ".c", ".cpp", ".html"}


@dataclass(frozen=True)
class Prose:
    train: str
    heldout: str
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]

    @property
    def digest(self) -> str:
        """sha256 (first 16 hex digits) of the held-out text: equal digests, equal evaluation text."""
        return hashlib.sha256(self.heldout.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (f"Python's reference docs and hydracc's dependencies' licences, held-out split ({len(self.heldout_files)} files, "
                f"{len(self.heldout):,} characters, sha256 {self.digest})")


def _dependency_closure(root: str = "hydracc") -> list[md.Distribution]:
    """Installed distributions ``root`` requires, directly or not (extras left out), sorted by name."""
    from packaging.requirements import InvalidRequirement, Requirement

    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return [seen[k] for k in sorted(seen)]


def _normalized(text: str) -> str:
    lines = [ln for ln in text.lower().splitlines() if "copyright" not in ln]
    return re.sub(r"[^a-z]+", "", " ".join(lines))


def _clean(text: str, *, drop_indented: bool = False) -> str:
    """Paragraphs with their line breaks joined; runs of rule characters and blank lines dropped
    (and, with ``drop_indented``, indented paragraphs: the code and grammar blocks of reST text)."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    out = []
    for p in paragraphs:
        if drop_indented and p.strip("\n")[:1].isspace():
            continue
        p = re.sub(r"[ \t]*\n[ \t]*", " ", p.strip())
        p = re.sub(r"([-=*_#~.])\1{3,}", "", p)
        p = re.sub(r"[ \t]{2,}", " ", p).strip()
        if sum(c.isalpha() for c in p) >= 20:
            out.append(p)
    return "\n\n".join(out)


def _documents() -> list[tuple[str, str]]:
    """(name, cleaned text) of every source document."""
    docs: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its docs: the licences alone
        topics = {}
    for key in sorted(topics):
        docs.append((f"pydoc_data.topics:{key}", _clean(topics[key], drop_indented=True)))
    for dist in _dependency_closure():
        for f in sorted(dist.files or [], key=str):
            if not _NAME.match(f.name) or f.suffix.lower() in _SKIP_SUFFIX:
                continue
            path = f.locate()
            try:
                raw = path.read_text(encoding="utf-8", errors="replace")  # type: ignore[union-attr]
            except OSError:
                continue
            docs.append((f"{dist.metadata['Name']}:{f.as_posix()}", _clean(raw)))
    return docs


@lru_cache(maxsize=1)
def prose_corpus() -> Prose:
    """The prose, deduplicated and split by document (licences: by licence family)."""
    found: dict[str, tuple[str, str]] = {}  # normalized text -> (name, cleaned text); the first name wins
    for name, text in _documents():
        norm = _normalized(text)
        if len(norm) >= 200 and norm not in found:
            found[norm] = (name, text)
    train: list[str] = []
    held: list[str] = []
    train_files: list[str] = []
    held_files: list[str] = []
    for norm, (name, text) in found.items():
        if zlib.crc32(norm[:600].encode()) % HELDOUT_MOD == 0:
            held.append(text)
            held_files.append(name)
        else:
            train.append(text)
            train_files.append(name)
    # a paragraph the calibration side also has (a shared licence clause) is not held out
    seen = {_normalized(p) for t in train for p in t.split("\n\n")}
    held = [kept for t in held if (kept := "\n\n".join(p for p in t.split("\n\n") if _normalized(p) not in seen))]
    return Prose("\n\n".join(train), "\n\n".join(held), tuple(train_files), tuple(held_files))

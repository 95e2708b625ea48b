"""Training data for a fine-tuning run from files, with the documents taken from a corpus file or the corpus store.

Judgements (BEIR queries + qrels) or pairs/triplets JSONL name the training signal;
the documents they refer to come from a corpus JSONL when one is given, else from
Lockstep's own corpus, which is what a user fine-tuning on their search corpus wants.
"""

from __future__ import annotations

from pathlib import Path

from indexer.corpus_store import CorpusStore
from indexer.ingest import read_corpus
from training.errors import InvalidInput
from training.eval_data import load_qrels, load_queries
from training.examples import load_pairs
from training.fine_tune import TrainingData


def _documents(corpus_file: Path | None, corpus: CorpusStore | None) -> dict[str, str]:
    if corpus_file is not None:
        return {doc.id: doc.embedding_text() for doc in read_corpus(corpus_file)}
    if corpus is not None:
        return {doc.id: doc.embedding_text() for doc in corpus.snapshot()[1]}
    return {}


def load_training_data(
    *,
    queries: Path | None = None,
    qrels: Path | None = None,
    corpus_file: Path | None = None,
    pairs: Path | None = None,
    corpus: CorpusStore | None = None,
) -> TrainingData:
    """Read pairs or judgements; errors name the file and line."""
    if pairs is not None:
        data = TrainingData.from_examples(load_pairs(pairs))
        data.documents.update(_documents(corpus_file, corpus))
        return data
    if not (queries and qrels):
        raise InvalidInput("give queries and qrels (BEIR files), or pairs (a pairs/triplets JSONL file)")
    documents = _documents(corpus_file, corpus)
    if not documents:
        raise InvalidInput("no documents: give a corpus JSONL file or ingest the corpus into Lockstep first")
    judgements = load_qrels(qrels)
    missing = {doc_id for judged in judgements.values() for doc_id in judged} - documents.keys()
    if len(missing) == sum(len(judged) for judged in judgements.values()):
        raise InvalidInput(f"{qrels}: none of the judged documents are in the corpus; check that the ids match")
    return TrainingData(load_queries(queries), judgements, documents)

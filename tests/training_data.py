"""A small synthetic retrieval task for training tests: queries are word subsets of their document."""

import random

from tests.conftest import WORDS
from training.fine_tune import TrainingData


def synthetic_task(documents: int = 80, seed: int = 0) -> TrainingData:
    rng = random.Random(seed)
    docs, queries, qrels = {}, {}, {}
    for i in range(documents):
        words = rng.sample(WORDS, 8)
        docs[f"d{i}"] = " ".join(words)
        queries[f"q{i}"] = " ".join(rng.sample(words, 3))
        qrels[f"q{i}"] = {f"d{i}": 1}
    return TrainingData(queries=queries, qrels=qrels, documents=docs)

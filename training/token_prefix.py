"""Cut very long texts before tokenizing them, without changing the tokens a model sees.

A fast tokenizer reads the whole text even when it keeps only the first few hundred
tokens: a 400,000-character document takes about 360 ms to tokenize for 256 tokens,
against 3 ms for its first 4,000 characters, and the reranker tokenizes every candidate
of every query. A text longer than `CHARS_PER_TOKEN` characters per needed token is cut
at its last space before that limit, and the prefix replaces it only if the prefix
alone still holds every token that will be kept. Cut at a space, the prefix tokenizes
exactly as the start of the whole text does (normalisation is per character, and
pre-tokenization splits at spaces), so truncation keeps the same tokens. A text whose
prefix falls short (long URLs, base64, text without spaces) is tokenized whole.

For a pair truncated `longest_first` (the reranker's query and document), which side
loses a token depends on which is longer, so a document's prefix must also hold more
tokens than its query (`longer_than`): then the document stays the longer side until
truncation has cut it below the prefix's length, and from there on both proceed alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

CHARS_PER_TOKEN = 16


def token_prefixes(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int, longer_than: Sequence[int] | None = None
) -> list[str]:
    """`texts`, each long one replaced by a prefix that tokenizes to the same first tokens as the whole text: at least
    `max_tokens` of them, and more than `longer_than[row]` where given (the length of the other side of a pair).
    A tokenizer that truncates from the left keeps a text's last tokens, so its texts are returned whole."""
    if tokenizer.truncation_side != "right":
        return list(texts)
    needed = [max(max_tokens, (longer_than[row] + 1) if longer_than is not None else 0) for row in range(len(texts))]
    prefixes = {}
    for row, text in enumerate(texts):
        limit = needed[row] * CHARS_PER_TOKEN
        if len(text) > limit and (end := text.rfind(" ", 0, limit)) > 0:
            prefixes[row] = text[:end]
    kept = list(texts)
    if not prefixes:
        return kept
    count_to = max(needed[row] for row in prefixes)
    counted = tokenizer(list(prefixes.values()), add_special_tokens=False, truncation=True, max_length=count_to)
    for (row, prefix), ids in zip(prefixes.items(), counted["input_ids"]):
        if len(ids) >= needed[row]:
            kept[row] = prefix
    return kept

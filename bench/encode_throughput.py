"""Corpus encoding throughput: Lockstep's encoder (fp32, bf16, int8) vs sentence-transformers (fp32, bf16 autocast).

Encodes the SciFact corpus (title + text, 256 tokens max) with the packaged
all-MiniLM-L6-v2 and prints documents/s, tokens/s, the speed-up over
sentence-transformers' default fp32 `encode` measured in the same run, cosine
agreement with it, and the share of this machine's measured matmul peak reached
(MiniLM-L6 costs about 24 MFLOP per token; int8 is measured against the fp32 peak).

    python bench/encode_throughput.py --data ../shared/data/scifact [--limit 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.bi_encoder import BiEncoder  # noqa: E402
from training.default_model import default_model_path  # noqa: E402
from training.precision import cpu_supports_bf16  # noqa: E402

FLOP_PER_TOKEN = 24e6


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured GFLOP/s of a square matrix multiplication in `dtype` (best of `repeats`)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def timed(fn) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    parser.add_argument("--limit", type=int, default=0, help="encode only the first N documents")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    rows = [json.loads(line) for line in (args.data / "corpus.jsonl").read_text().splitlines()]
    texts = [f"{r['title']} {r['text']}".strip() for r in rows][: args.limit or None]
    ours = BiEncoder.load(default_model_path())
    tokens = int(sum(len(ids) for ids in ours.tokenize(texts, "document")))
    theirs = SentenceTransformer(str(default_model_path()), device="cpu")
    ours.encode(texts[:64])
    theirs.encode(texts[:64])

    runs: dict[str, tuple[np.ndarray, float]] = {}
    runs["sentence-transformers fp32"] = timed(lambda: theirs.encode(texts, normalize_embeddings=True))
    if cpu_supports_bf16():
        def st_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return theirs.encode(texts, normalize_embeddings=True)
        runs["sentence-transformers bf16 autocast"] = timed(st_bf16)
    precisions = ("fp32", "bf16", "int8") if cpu_supports_bf16() else ("fp32", "int8")
    with tempfile.TemporaryDirectory() as scratch:
        for precision in precisions:
            if precision == "int8":
                ours.use_int8(ours.export_int8(Path(scratch) / "encoder.int8.onnx"))
                ours.encode(texts[:64])
            else:
                ours.precision = precision
            runs[f"lockstep {precision}"] = timed(lambda: ours.encode(texts, batch_size=args.batch_size, show_progress=False))

    peak = {"fp32": matmul_peak(torch.float32)}
    if cpu_supports_bf16():
        peak["bf16"] = matmul_peak(torch.bfloat16)
    reference, base_time = runs["sentence-transformers fp32"]
    print(f"{len(texts)} documents, {tokens} tokens, {torch.get_num_threads()} threads; "
          f"matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    print(f"{'encoder':<38}{'docs/s':>9}{'tokens/s':>11}{'vs ST fp32':>12}{'min cos':>10}{'% peak':>9}")
    for name, (vectors, seconds) in runs.items():
        cosine = float(np.sum(vectors * reference, axis=1).min())
        share = tokens * FLOP_PER_TOKEN / seconds / 1e9 / peak["bf16" if "bf16" in name else "fp32"]
        print(f"{name:<38}{len(texts) / seconds:>9.1f}{tokens / seconds:>11.0f}{base_time / seconds:>11.2f}x{cosine:>10.5f}{share:>8.1%}")
    print("reproduce: python bench/encode_throughput.py --data ../shared/data/scifact")


if __name__ == "__main__":
    main()

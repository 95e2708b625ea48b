"""Corpus encoding throughput: Lockstep's encoder (fp32, bf16 and int8 on each runtime) vs sentence-transformers.

Encodes the SciFact corpus (title + text, 256 tokens max) with the packaged
all-MiniLM-L6-v2, for each precision on each runtime (openvino when installed; int8
on torch means dynamic quantisation on ONNX Runtime, on openvino both static
quantisation calibrated on 128 seeded corpus documents, as a release build does, and
int8 weights with dynamically quantised activations), and
prints documents/s, tokens/s, the speed-up over sentence-transformers' default fp32
`encode` and over it under bf16 autocast (both measured in the same run), cosine
agreement with its fp32 vectors (least and mean), the share of this machine's measured matmul peak
reached (MiniLM-L6 costs about 24 MFLOP per token; int8 is measured against the int8
peak) and, over the whole corpus, nDCG@10 on the 809 judged SciFact train queries
(test labels are held back) by exact search with each encoder. The encoders take turns
on slices of the corpus (`--rounds`), so load from elsewhere on a shared machine falls
on all of them alike.
The peak is the best of a square 2048 product and the model's own feed-forward shape
(8,192 tokens x 384 x 1,536), since oneDNN reaches AMX's rate only on some shapes,
measured before and after the encoding.

With `--device cuda` both run on the GPU: sentence-transformers in fp32 and under bf16
and fp16 autocast, Lockstep in fp32, bf16 (where the GPU has it) and fp16 on torch
(int8 is a CPU path), against the GPU's measured matmul peaks.

    python bench/encode_throughput.py --data ../shared/data/scifact [--limit 2000] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.targets import verdict  # noqa: E402
from indexer.release_builder import int8_samples  # noqa: E402
from indexer.release_runtime import choose_runtime, quantise_int8  # noqa: E402
from training.bi_encoder import MAX_BATCH_TOKENS, BiEncoder  # noqa: E402
from training.default_model import default_model_path  # noqa: E402
from training.eval_data import load_qrels, load_queries  # noqa: E402
from training.evaluation import evaluate_run  # noqa: E402
from training.precision import cpu_has_int8_dot, cpu_supports_bf16  # noqa: E402

try:
    import openvino  # noqa: F401
    RUNTIMES = ("torch", "openvino")
except ImportError:
    RUNTIMES = ("torch",)
try:
    import nncf  # noqa: F401
    OPENVINO_INT8 = True
except ImportError:
    OPENVINO_INT8 = False

FLOP_PER_TOKEN = 24e6


MATMUL_SHAPES = ((2048, 2048, 2048), (8192, 384, 1536))


def matmul_peak(dtype: torch.dtype, device: str = "cpu", repeats: int = 10) -> float:
    """Measured GFLOP/s (GOP/s for int8, through oneDNN's int8 kernels) of matrix multiplication in `dtype` on
    `device`: the best over `MATMUL_SHAPES` and `repeats`."""
    best = 0.0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for m, k, n in MATMUL_SHAPES:
        if dtype == torch.int8:
            a, b = torch.randint(-128, 128, (m, k), dtype=dtype), torch.randint(-128, 128, (k, n), dtype=dtype)
            mm = torch._int_mm
        else:
            a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            mm = torch.mm
        mm(a, b)
        sync()
        for _ in range(repeats):
            started = time.perf_counter()
            mm(a, b)
            sync()
            best = max(best, 2 * m * k * n / (time.perf_counter() - started) / 1e9)
    return best


def matmul_peaks(device: str) -> dict[str, float]:
    """`matmul_peak` of each precision `device` runs natively: on a CPU bf16 and int8 only where it has the
    instructions (without VNNI or AMX, torch's int8 product is a reference loop far below the int8 units' rate);
    on a GPU fp32, fp16 and bf16 where it has it."""
    if device == "cuda":
        dtypes = {"fp32": torch.float32, "fp16": torch.float16,
                  **({"bf16": torch.bfloat16} if torch.cuda.is_bf16_supported() else {})}
    else:
        dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if cpu_supports_bf16() else {}),
                  **({"int8": torch.int8} if cpu_has_int8_dot() else {})}
    return {name: matmul_peak(dtype, device) for name, dtype in dtypes.items()}


def exact_ndcg(qrels: dict, doc_ids: list[str], vectors: np.ndarray, queries: np.ndarray, query_ids: list[str]) -> float:
    """nDCG@10 of exact inner-product search over `vectors` for the judged queries."""
    top = np.argsort(-(queries @ vectors.T), axis=1)[:, :100]
    run = {q: {doc_ids[j]: float(queries[i] @ vectors[j]) for j in row} for i, (q, row) in enumerate(zip(query_ids, top))}
    return evaluate_run(run, {q: qrels[q] for q in query_ids})["ndcg@10"]


def report_targets(results: dict[str, tuple[float, float, float, float, float]]) -> None:
    """Say for each encode target whether the best qualifying encoder meets it, and by how much it misses.

    `results` maps an encoder to (speed-up over ST fp32, over ST bf16, min cosine, mean cosine, nDCG@10). The
    cosine targets are read both ways: every document at 0.999 or above, and 0.999 on average.
    """
    least_rows = {name: r for name, r in results.items() if name.startswith("lockstep") and r[2] >= 0.999}
    mean_rows = {name: r for name, r in results.items() if name.startswith("lockstep") and r[3] >= 0.999}
    fp32_ndcg = results["sentence-transformers fp32"][4]
    int8_rows = {name: r for name, r in results.items() if "int8" in name and abs(r[4] - fp32_ndcg) <= 0.01}
    targets = [("vs ST fp32 at min cosine >= 0.999", least_rows, 0, 4.0),
               ("vs ST fp32 at mean cosine >= 0.999", mean_rows, 0, 4.0),
               ("vs ST bf16 autocast at min cosine >= 0.999", least_rows, 1, 1.6),
               ("vs ST bf16 autocast at mean cosine >= 0.999", mean_rows, 1, 1.6),
               ("int8 vs ST fp32 at nDCG@10 within 0.01", int8_rows, 0, 6.0)]
    for label, rows, column, goal in targets:
        if column == 1 and "sentence-transformers bf16 autocast" not in results:
            print(f"target {goal}x {label}: not measured, this machine has no bf16")
            continue
        if not rows:
            print(f"target {goal}x {label}: no encoder qualifies"
                  + ("; nDCG@10 needs the whole corpus (no --limit)" if "nDCG" in label else ""))
            continue
        name = max(rows, key=lambda key: rows[key][column])
        print(verdict(label, rows[name][column], goal) + f", by {name}")


def interleaved(encoders: dict[str, Callable[[list[str]], np.ndarray]], texts: list[str],
                rounds: int) -> dict[str, tuple[np.ndarray, float]]:
    """Each encoder's vectors for `texts` and its seconds in all, measured in `rounds` rounds.

    Each round gives every encoder the same contiguous slice of the corpus, in an order
    that rotates from round to round, so a neighbour's load that comes and goes during
    the run slows every encoder alike instead of whichever ran at the time.
    """
    names = list(encoders)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for index, rows in enumerate(np.array_split(np.arange(len(texts)), min(rounds, len(texts)))):
        chunk = [texts[row] for row in rows]
        for name in names[index % len(names):] + names[: index % len(names)]:
            started = time.perf_counter()
            parts[name].append(encoders[name](chunk))
            seconds[name] += time.perf_counter() - started
    return {name: (np.concatenate(parts[name]), seconds[name]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    parser.add_argument("--limit", type=int, default=0, help="encode only the first N documents")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS, help="padded tokens per batch at most")
    parser.add_argument("--rounds", type=int, default=8, help="slices of the corpus each encoder takes in turn")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    from sentence_transformers import SentenceTransformer

    rows = [json.loads(line) for line in (args.data / "corpus.jsonl").read_text().splitlines()]
    texts = [f"{r['title']} {r['text']}".strip() for r in rows][: args.limit or None]
    doc_ids = [str(r["_id"]) for r in rows][: len(texts)]
    judged = load_qrels(args.data / "qrels" / "train.tsv")
    all_queries = load_queries(args.data / "queries.jsonl")
    query_ids = [q for q in all_queries if q in judged]
    query_texts = [all_queries[q] for q in query_ids]
    query_vectors: dict[str, np.ndarray] = {}
    tokens = int(sum(len(ids) for ids in BiEncoder.load(default_model_path()).tokenize(texts, "document")))
    theirs = SentenceTransformer(str(default_model_path()), device=args.device)
    theirs.encode(texts[:64])

    peak = matmul_peaks(args.device)
    encoders: dict[str, Callable[[list[str]], np.ndarray]] = {
        "sentence-transformers fp32": lambda chunk: theirs.encode(chunk, normalize_embeddings=True,
                                                                  show_progress_bar=False),
    }
    query_vectors["sentence-transformers fp32"] = theirs.encode(query_texts, normalize_embeddings=True,
                                                                show_progress_bar=False)
    has_bf16 = torch.cuda.is_bf16_supported() if gpu else cpu_supports_bf16()
    for half, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (half == "bf16" and not has_bf16) or (half == "fp16" and not gpu):
            continue

        def theirs_half(chunk: list[str], dtype: torch.dtype = dtype) -> np.ndarray:
            with torch.autocast(args.device, dtype=dtype):
                return theirs.encode(chunk, normalize_embeddings=True, show_progress_bar=False)

        encoders[f"sentence-transformers {half} autocast"] = theirs_half
        query_vectors[f"sentence-transformers {half} autocast"] = theirs_half(query_texts)
    precisions = ("fp32", "bf16") if has_bf16 else ("fp32",)
    if gpu:
        configs = [("torch", precision, "auto") for precision in (*precisions, "fp16")]
    else:
        configs = [(runtime, precision, "auto") for runtime in RUNTIMES for precision in (*precisions, "int8")
                   if (runtime, precision) != ("openvino", "int8") or OPENVINO_INT8]
        if "openvino" in RUNTIMES and OPENVINO_INT8:
            configs.append(("openvino", "int8", "dynamic"))
    calibration = [texts[row] for row in int8_samples(len(texts), 0)[1]]
    with tempfile.TemporaryDirectory() as scratch:
        for runtime, precision, activations in configs:
            encoder = BiEncoder.load(default_model_path(), device=args.device)
            choose_runtime(encoder, precision, runtime)
            name = f"lockstep {precision} ({encoder.runtime})"
            if precision == "int8":
                folder = Path(scratch) / f"{runtime}-{activations}"
                folder.mkdir()
                encoder.use_int8(quantise_int8(encoder, folder, runtime, activations, calibration))
                name = f"lockstep int8 ({encoder.runtime}" + (", dynamic)" if activations == "dynamic" else ")")
            encoder.encode(texts[:64], show_progress=False)
            encoders[name] = lambda chunk, encoder=encoder: encoder.encode(
                chunk, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, show_progress=False)
            query_vectors[name] = encoder.encode(query_texts, "query", show_progress=False)
        runs = interleaved(encoders, texts, args.rounds)

    after = matmul_peaks(args.device)
    peak = {name: max(before, after[name]) for name, before in peak.items()}
    reference, base_time = runs["sentence-transformers fp32"]
    bf16_time = runs.get("sentence-transformers bf16 autocast", (None, float("nan")))[1]

    def versus_bf16(seconds: float) -> str:
        return f"{bf16_time / seconds:>11.2f}x" if math.isfinite(bf16_time) else f"{'n/a':>12}"

    print(f"{len(texts)} documents, {tokens} tokens, {torch.get_num_threads()} threads; "
          f"matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
          + ("" if "int8" in peak or gpu else "; int8 peak n/a: no VNNI or AMX int8 instructions"))
    whole = len(texts) == len(rows)
    print(f"batch {args.batch_size} texts / {args.max_batch_tokens} padded tokens for Lockstep, 32 texts for sentence-transformers"
          + ("" if whole else "; nDCG@10 needs the whole corpus (no --limit)"))
    print(f"{'encoder':<38}{'docs/s':>9}{'tokens/s':>11}{'vs ST fp32':>12}{'vs ST bf16':>12}{'min cos':>10}"
          f"{'mean cos':>10}{'% peak':>9}{'nDCG@10':>9}")
    results = {}
    for name, (vectors, seconds) in runs.items():
        cosines = np.sum(vectors * reference, axis=1)
        cosine, mean_cosine = float(cosines.min()), float(cosines.mean())
        peak_name = next((p for p in ("bf16", "fp16", "int8") if p in name), "fp32")
        share = tokens * FLOP_PER_TOKEN / seconds / 1e9 / peak[peak_name] if peak_name in peak else float("nan")
        ndcg = exact_ndcg(judged, doc_ids, vectors, query_vectors[name], query_ids) if whole else float("nan")
        results[name] = (base_time / seconds, bf16_time / seconds, cosine, mean_cosine, ndcg)
        print(f"{name:<38}{len(texts) / seconds:>9.1f}{tokens / seconds:>11.0f}{base_time / seconds:>11.2f}x"
              f"{versus_bf16(seconds)}{cosine:>10.5f}{mean_cosine:>10.5f}"
              + (f"{share:>8.1%}" if math.isfinite(share) else f"{'n/a':>8}") + f"{ndcg:>9.4f}")
    report_targets(results)
    print(f"reproduce: python bench/encode_throughput.py --data {args.data}"
          + (f" --limit {args.limit}" if args.limit else "") + f" --batch-size {args.batch_size}"
          + f" --max-batch-tokens {args.max_batch_tokens} --rounds {args.rounds}"
          + (" --device cuda" if gpu else ""))


if __name__ == "__main__":
    main()

"""Single-query latency and recall of `mmt.search`'s faiss index at a million images.

The vectors stand in for image embeddings: unit length, dimension 128 (retrieval-small's
embed_dim), and clustered as real embeddings are: each is one of `--centres` random
directions plus Gaussian noise of norm ~`--noise`, renormalised, with cluster sizes drawn
unevenly (log-normal weights), since real galleries hold many photos of a few things and
few of most. `--uniform` draws them uniformly on the sphere instead (no structure: the
hardest case for any partitioning index). Queries are stored vectors perturbed by noise of
norm ~`--query-noise` (a near-duplicate photo; a text query lands near the images it
describes), searched one at a time for the top 10, after a short warm-up.

Reported:
- build time of the index `mmt.search.make_faiss_index` picks at this size (IVF-Flat above
  50,000 vectors: k-means training on a sample plus adding every vector);
- p50 / p90 / p99 / mean latency of single queries, in milliseconds;
- recall@10 against exact search (faiss IndexFlatIP) on the first `--recall-queries` queries,
  and how often the top-1 agrees;
- the exact brute-force p50 on `--exact-queries` single queries (the peer baseline: what a
  query costs without the approximate index) and the speed-up;
- the same latency and recall for the other nprobe values of `--sweep`.

    python benchmarks/search_latency.py [--n 1000000] [--dim 128] [--queries 1000] [--nprobe 32] [--threads 1] [--uniform]

Memory: the vectors, the IVF index and the exact index each hold n x dim float32 (512 MB
apiece at 1M x 128).
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from mmt.search import EXACT_BELOW, NPROBE, make_faiss_index

K = 10
BLOCK = 100_000  # vectors generated per block, to keep temporaries small


def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def synthetic_vectors(args) -> np.ndarray:
    """(n, dim) float32 unit vectors: clustered (default) or uniform on the sphere."""
    rng = np.random.default_rng(args.seed)
    vectors = np.empty((args.n, args.dim), np.float32)
    if args.uniform:
        for start in range(0, args.n, BLOCK):
            stop = min(start + BLOCK, args.n)
            vectors[start:stop] = unit_rows(rng.standard_normal((stop - start, args.dim), dtype=np.float32))
        return vectors
    centres = unit_rows(rng.standard_normal((args.centres, args.dim), dtype=np.float32))
    weights = rng.lognormal(0.0, 1.0, args.centres)
    weights /= weights.sum()
    scale = args.noise / np.sqrt(args.dim)  # noise of norm ~args.noise
    for start in range(0, args.n, BLOCK):
        stop = min(start + BLOCK, args.n)
        which = rng.choice(args.centres, stop - start, p=weights)
        noise = rng.standard_normal((stop - start, args.dim), dtype=np.float32)
        vectors[start:stop] = unit_rows(centres[which] + scale * noise)
    return vectors


def make_queries(vectors: np.ndarray, args) -> np.ndarray:
    rng = np.random.default_rng(args.seed + 1)
    picked = vectors[rng.choice(len(vectors), args.queries, replace=False)]
    noise = rng.standard_normal(picked.shape, dtype=np.float32) * (args.query_noise / np.sqrt(args.dim))
    return np.ascontiguousarray(unit_rows(picked + noise))


def single_query_ms(index: faiss.Index, queries: np.ndarray, warmup: int = 20) -> np.ndarray:
    """Milliseconds of each query searched alone (top K)."""
    for q in queries[:warmup]:
        index.search(q[None], K)
    times = np.empty(len(queries))
    for i, q in enumerate(queries):
        query = q[None]  # (1, dim)
        start = time.perf_counter()
        index.search(query, K)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed")
    parser.add_argument("--nprobe", type=int, default=NPROBE, help="IVF cells scanned per query")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~4 sqrt(n))")
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--uniform", action="store_true", help="uniform vectors on the sphere instead of clusters")
    parser.add_argument("--centres", type=int, default=3000, help="clusters of the synthetic data")
    parser.add_argument("--noise", type=float, default=0.75, help="norm of a vector's offset from its cluster centre")
    parser.add_argument("--query-noise", type=float, default=0.1, help="norm of a query's offset from its stored vector")
    parser.add_argument("--recall-queries", type=int, default=200, help="queries checked against exact search")
    parser.add_argument("--exact-queries", type=int, default=30, help="single queries timed on the exact index")
    parser.add_argument("--sweep", default="8,16,64", help="other nprobe values to report (comma-separated; empty: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    print(f"faiss {faiss.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    kind = "uniform on the sphere" if args.uniform else f"{args.centres} clusters, noise {args.noise}"
    print(f"data: {args.n:,} unit vectors x {args.dim} ({kind}); {args.queries} queries (stored vectors + noise {args.query_noise}), top {K}")
    start = time.perf_counter()
    vectors = synthetic_vectors(args)
    queries = make_queries(vectors, args)
    print(f"generated in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    index = make_faiss_index(vectors, nlist=args.nlist, nprobe=args.nprobe)
    build_s = time.perf_counter() - start
    ivf = faiss.try_extract_index_ivf(index)
    name = f"IndexIVFFlat nlist={ivf.nlist} nprobe={ivf.nprobe}" if ivf is not None else "IndexFlatIP (below the exact threshold)"
    print(f"index: {name} (mmt.search.make_faiss_index, exact below {EXACT_BELOW:,}); built in {build_s:.1f} s")

    start = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    del vectors  # both indexes hold their own copy
    print(f"exact IndexFlatIP built in {time.perf_counter() - start:.1f} s")
    check = queries[: args.recall_queries]
    _, truth = exact.search(check, K)  # (R, K), batched

    def measure(nprobe: int, timed: np.ndarray) -> tuple[np.ndarray, float, float]:
        if ivf is not None:
            ivf.nprobe = nprobe
        times = single_query_ms(index, timed)
        _, found = index.search(check, K)
        return times, recall_at_k(found, truth), float(np.mean(found[:, 0] == truth[:, 0]))

    times, recall, top1 = measure(args.nprobe, queries)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    print(f"\nsingle-query latency over {len(times)} queries (ms): p50 {p50:.3f}  p90 {p90:.3f}  p99 {p99:.3f}  mean {times.mean():.3f}  max {times.max():.3f}")
    print(f"recall@{K} vs exact (IndexFlatIP) on {len(check)} queries: {recall:.4f}; top-1 agrees {top1:.4f}")

    exact_times = single_query_ms(exact, queries[: args.exact_queries], warmup=2)
    exact_p50 = float(np.median(exact_times))
    print(f"exact brute force (IndexFlatIP, peer baseline) p50 over {len(exact_times)} queries: {exact_p50:.2f} ms  "
          f"-> approximate is {exact_p50 / p50:.0f}x faster at p50")

    sweep = [int(v) for v in args.sweep.split(",") if v.strip()] if ivf is not None else []
    if sweep:
        print(f"\n{'nprobe':>7} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>10} {'top-1':>7}   (first {min(300, len(queries))} queries timed)")
        for nprobe in sorted(set(sweep + [args.nprobe])):
            t, r, t1 = measure(nprobe, queries[:300])
            print(f"{nprobe:>7} {np.percentile(t, 50):>8.3f} {np.percentile(t, 99):>8.3f} {r:>10.4f} {t1:>7.4f}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

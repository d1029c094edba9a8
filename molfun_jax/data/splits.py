"""Train / validation / test splits: random (seeded fractions), temporal (by year) and
sequence-identity clusters (no held-out sequence >= threshold identical to a training one).

The `*_indices` functions work on plain arrays (one entry per example); `random_split`,
`temporal_split` and `identity_split` apply them to an `AffinityDataset` and return its subsets.
"""
from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from Bio import Align
from Bio.Align import substitution_matrices
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    from molfun_jax.data.dataset import AffinityDataset

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
IDENTITY_MIN_LENGTH = 30  # identity denominators are at least this (see `sequence_identity`)


def _counts(n: int, fractions: Sequence[float]) -> list[int]:
    f = np.asarray(fractions, np.float64)
    if f.ndim != 1 or len(f) < 2 or np.any(f < 0) or abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0, at least 2 of them, summing to 1; got {tuple(fractions)}")
    rest = [int(round(n * x)) for x in f[1:]]
    while sum(rest) > n:  # rounding up everywhere can overshoot by one or two
        rest[int(np.argmax(rest))] -= 1
    return [n - sum(rest)] + rest


def random_split_indices(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[np.ndarray]:
    """Disjoint index sets covering range(n), of sizes round(n * fraction) (the first split takes
    the rest), drawn with `seed`; each set sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + _counts(n, fractions))
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def temporal_split_indices(years: Sequence[Optional[int]], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                           cutoffs: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Split by year, oldest first: every year of split k is earlier than every year of split
    k + 1 (entries of one year stay together). `cutoffs` (one fewer than the splits) are the
    first years of splits 1, 2, ...; without them, year boundaries are chosen so that the split
    sizes come closest to `fractions`."""
    if any(y is None for y in years):
        missing = sum(y is None for y in years)
        raise ValueError(f"temporal split needs a year for every entry; {missing} of {len(years)} have none")
    y = np.asarray(years, np.int64)
    n_splits = len(fractions)
    if cutoffs is None:
        counts = _counts(len(y), fractions)
        uniq, per_year = np.unique(y, return_counts=True)
        cum = np.concatenate([[0], np.cumsum(per_year)])  # entries before uniq[i]
        cutoffs, lo = [], 0
        for target in np.cumsum(counts)[:-1]:
            i = lo + int(np.argmin(np.abs(cum[lo:] - target)))
            cutoffs.append(int(uniq[i]) if i < len(uniq) else int(uniq[-1]) + 1)
            lo = i
    elif len(cutoffs) != n_splits - 1 or any(a > b for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"need {n_splits - 1} non-decreasing cutoff years, got {tuple(cutoffs)}")
    edges = [-np.inf, *cutoffs, np.inf]
    return [np.flatnonzero((y >= a) & (y < b)) for a, b in zip(edges[:-1], edges[1:])]


@functools.lru_cache(maxsize=1)
def _aligner() -> Align.PairwiseAligner:
    return Align.PairwiseAligner(mode="global", substitution_matrix=substitution_matrices.load("BLOSUM62"),
                                 open_gap_score=-11.0, extend_gap_score=-1.0, end_gap_score=0.0)


def sequence_identity(a: str, b: str) -> float:
    """Identical residue pairs of the best global alignment (BLOSUM62, gap open -11 / extend -1,
    free end gaps) over the length of the shorter sequence, counted as at least
    `IDENTITY_MIN_LENGTH` (or the longer one's length if less), so that chance matches of a short
    peptide do not link it to unrelated proteins."""
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    denom = max(min(len(a), len(b)), min(max(len(a), len(b)), IDENTITY_MIN_LENGTH))
    a, b = sorted((a, b))  # the aligner breaks ties between equal-scoring alignments by argument order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aln = _aligner().align(a, b)[0]
    same = sum(a[i] == b[j] for (a0, a1), (b0, b1) in zip(*aln.aligned) for i, j in zip(range(a0, a1), range(b0, b1)))
    return same / denom


def identity_clusters(sequences: Sequence[Sequence[str]], threshold: float = 0.3) -> np.ndarray:
    """[n] cluster label of each entry (an entry is one or more chain sequences): the connected
    components of the graph linking two entries when any chain of one is >= `threshold`
    identical to any chain of the other (every pair of distinct sequences is aligned). Entries
    of different clusters are therefore < threshold identical, chain by chain. Labels are
    numbered in order of each cluster's first entry."""
    n = len(sequences)
    uniq = sorted({s for seqs in sequences for s in seqs})
    index = {s: n + i for i, s in enumerate(uniq)}  # graph nodes: entries 0..n-1, then sequences
    edges = [(e, index[s]) for e, seqs in enumerate(sequences) for s in seqs]
    edges += [(n + i, n + j) for i in range(len(uniq)) for j in range(i + 1, len(uniq))
              if sequence_identity(uniq[i], uniq[j]) >= threshold]
    rows, cols = np.asarray(edges, np.int64).reshape(-1, 2).T
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n + len(uniq),) * 2)
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels[:n], return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


def identity_split_indices(sequences: Sequence[Sequence[str]], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                           threshold: float = 0.3, seed: int = 0,
                           clusters: Optional[Sequence] = None) -> list[np.ndarray]:
    """Split whole identity clusters (`identity_clusters`, or given `clusters` labels, e.g. from
    MMseqs2 for large sets: the pairwise alignment here is O(n^2)): largest clusters first (ties
    in `seed` order), each into the split furthest below its target size."""
    labels = identity_clusters(sequences, threshold) if clusters is None else np.unique(
        np.asarray(clusters), return_inverse=True)[1]
    n = len(labels)
    targets = np.asarray(_counts(n, fractions), np.float64)
    ids, sizes = np.unique(labels, return_counts=True)
    tie = np.random.default_rng(seed).permutation(len(ids))
    order = sorted(range(len(ids)), key=lambda c: (-sizes[c], tie[c]))
    filled = np.zeros(len(targets))
    assign = np.empty(n, np.int64)
    for c in order:
        k = int(np.argmax((targets - filled) / np.maximum(targets, 1)))
        filled[k] += sizes[c]
        assign[labels == ids[c]] = k
    return [np.flatnonzero(assign == k) for k in range(len(targets))]


def random_split(dataset: "AffinityDataset", fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 seed: int = 0) -> tuple["AffinityDataset", ...]:
    """Random (seeded) subsets of the given fractions, e.g. (train, val, test)."""
    return tuple(dataset.subset(i) for i in random_split_indices(len(dataset), fractions, seed))


def temporal_split(dataset: "AffinityDataset", fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   cutoffs: Optional[Sequence[int]] = None) -> tuple["AffinityDataset", ...]:
    """Subsets by year (CSV `year`, else the structure's release year), oldest first."""
    return tuple(dataset.subset(i) for i in temporal_split_indices(dataset.years, fractions, cutoffs))


def identity_split(dataset: "AffinityDataset", fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   threshold: float = 0.3, seed: int = 0,
                   clusters: Optional[Sequence] = None) -> tuple["AffinityDataset", ...]:
    """Subsets of whole sequence-identity clusters: no sequence of a later split is >= `threshold`
    (default 30%) identical to a sequence of another split."""
    idx = identity_split_indices(dataset.chain_sequences, fractions, threshold, seed, clusters)
    return tuple(dataset.subset(i) for i in idx)

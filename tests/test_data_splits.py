"""Property tests of the splitters: partitions without overlap, seeded sizes, years ordered
across splits, and the sequence-identity bound between splits."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from molfun_jax.data import (identity_clusters, identity_split_indices, random_split_indices, sequence_identity,
                             temporal_split_indices)

AA = "ACDEFGHIKLMNPQRSTVWY"
fractions = st.lists(st.floats(0.05, 1.0), min_size=2, max_size=3).map(lambda f: [x / sum(f) for x in f])


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate([np.asarray(p, np.int64) for p in parts])
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n)), "overlap or missing entries"


@given(n=st.integers(0, 300), fr=fractions, seed=st.integers(0, 2**31))
def test_random_split_is_a_seeded_partition(n, fr, seed):
    parts = random_split_indices(n, fr, seed)
    assert_partition(parts, n)
    for p, f in zip(parts[1:], fr[1:]):
        assert abs(len(p) - n * f) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, random_split_indices(n, fr, seed)))


@given(years=st.lists(st.integers(1990, 2025), min_size=1, max_size=150), fr=fractions)
def test_temporal_split_orders_years(years, fr):
    parts = temporal_split_indices(years, fr)
    assert_partition(parts, len(years))
    y = np.asarray(years)
    spans = [(y[p].min(), y[p].max()) for p in parts if len(p)]
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans


@given(years=st.lists(st.integers(1990, 2025), min_size=1, max_size=80),
       cuts=st.lists(st.integers(1985, 2030), min_size=2, max_size=2).map(sorted))
def test_temporal_split_with_cutoff_years(years, cuts):
    train, val, test = temporal_split_indices(years, (0.8, 0.1, 0.1), cutoffs=cuts)
    y = np.asarray(years)
    assert np.all(y[train] < cuts[0]) and np.all((y[val] >= cuts[0]) & (y[val] < cuts[1]))
    assert np.all(y[test] >= cuts[1])
    assert_partition([train, val, test], len(years))


def test_temporal_split_needs_years():
    with pytest.raises(ValueError, match="1 of 3 have none"):
        temporal_split_indices([2001, None, 2003])


@st.composite
def protein_families(draw) -> list[list[str]]:
    """Entries of 1-2 chains: a few families of mutated / indel variants of random sequences,
    plus unrelated singletons (so some pairs sit near any threshold)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    seqs = []
    for _ in range(draw(st.integers(1, 4))):
        base = rng.choice(list(AA), rng.integers(20, 60))
        for _ in range(draw(st.integers(1, 4))):
            s = base.copy()
            mut = rng.random(len(s)) < rng.uniform(0.0, 0.8)
            s[mut] = rng.choice(list(AA), mut.sum())
            cut = rng.integers(0, 6)
            seqs.append("".join(s[cut:len(s) - rng.integers(0, 6)]))
    seqs += ["".join(rng.choice(list(AA), rng.integers(5, 60))) for _ in range(draw(st.integers(0, 4)))]
    order = rng.permutation(len(seqs))
    entries, i = [], 0
    while i < len(order):
        k = 2 if rng.random() < 0.2 and i + 1 < len(order) else 1
        entries.append([seqs[j] for j in order[i:i + k]])
        i += k
    return entries


@settings(max_examples=30, deadline=None)
@given(entries=protein_families(), fr=fractions, threshold=st.sampled_from([0.3, 0.5]), seed=st.integers(0, 99))
def test_identity_split_bound(entries, fr, threshold, seed):
    """No chain of an entry in one split is >= threshold identical to a chain in another split."""
    parts = identity_split_indices(entries, fr, threshold, seed)
    assert_partition(parts, len(entries))
    for p, q in itertools.combinations(parts, 2):
        for i in p:
            for j in q:
                for a in entries[i]:
                    for b in entries[j]:
                        assert sequence_identity(a, b) < threshold, (a, b)


# found by hypothesis: the aligner's tie-break between equal-scoring alignments made
# sequence_identity(a, b) 0.129 and sequence_identity(b, a) 0.323 for the first two entries
TIE_BREAK_ENTRIES = [["EHYVIGTPKWNGTCWITQWLGPPHVFACMNV"],
                     ["WMEMFLPQNKMTTPHALKWEMGHHHMWWFACMFHNCIGG", "MHPYHTLPQEACYMGQCPPNGSVGWDCYTACWL"],
                     ["NSLRDSKIVLGSWHMHQWGVEPMYFVAKIIEDCYVADGWL"]]


@settings(max_examples=20, deadline=None)
@given(entries=protein_families(), threshold=st.sampled_from([0.3, 0.5]))
@example(entries=TIE_BREAK_ENTRIES, threshold=0.3)
def test_identity_clusters_are_the_transitive_closure(entries, threshold):
    """Same clusters as a brute-force closure of the entry graph (linked when any chain pair is
    >= threshold identical, a shared chain included), by Warshall's algorithm."""
    n = len(entries)
    reach = np.eye(n, dtype=bool) | np.array([[any(sequence_identity(a, b) >= threshold for a in p for b in q)
                                                for q in entries] for p in entries], dtype=bool).reshape(n, n)
    for k in range(n):
        reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
    labels = identity_clusters(entries, threshold)
    np.testing.assert_array_equal(labels[:, None] == labels[None, :], reach)


def test_identity_clusters_hand_derived():
    """A ~ B ~ C chain of half-mutated sequences (A, C unrelated) is one cluster; a two-chain
    entry bridges two others; an entry without chains is alone. Labels in first-entry order."""
    rng = np.random.default_rng(1)
    rand = lambda k: "".join(rng.choice(list(AA), k))
    a = rand(60)
    b = a[:30] + rand(30)
    c = rand(30) + b[30:]
    d, e = rand(60), rand(60)
    assert sequence_identity(a, b) >= 0.4 and sequence_identity(b, c) >= 0.4
    assert max(sequence_identity(x, y) for x, y in itertools.combinations([a, c, d, e], 2)) < 0.4
    entries = [[d], [a], [e], [c], [d, e], [], [b], [d]]
    np.testing.assert_array_equal(identity_clusters(entries, 0.4), [0, 1, 0, 1, 0, 2, 1, 0])


def test_identity_split_keeps_families_together_and_fills_fractions():
    rng = np.random.default_rng(0)
    entries, family = [], []
    for f in range(10):
        base = rng.choice(list(AA), 80)
        for _ in range(3):
            s = base.copy()
            mut = rng.random(80) < 0.2
            s[mut] = rng.choice(list(AA), mut.sum())
            entries.append(["".join(s)])
            family.append(f)
    labels = identity_clusters(entries, 0.3)
    assert len(set(labels)) == 10 and all(len(set(labels[np.asarray(family) == f])) == 1 for f in range(10))
    train, val, test = identity_split_indices(entries, (0.8, 0.1, 0.1), 0.3, seed=0)
    assert (len(train), len(val), len(test)) == (24, 3, 3)
    given_labels = identity_split_indices(entries, (0.8, 0.1, 0.1), clusters=family)
    assert all(len({family[i] for i in p}) == len(p) // 3 for p in given_labels)


def test_sequence_identity():
    rng = np.random.default_rng(1)
    a = "".join(rng.choice(list(AA), 120))
    b = "".join(rng.choice(list(AA), 110))
    assert sequence_identity(a, a) == 1.0
    assert sequence_identity(a, b) < 0.3  # unrelated: about 0.2 at this length
    mutant = np.array(list(a))
    mutant[::10] = "W"
    assert sequence_identity(a, "".join(mutant)) > 0.85
    assert sequence_identity(a[10:50], a) == 1.0  # a fragment, over its own length
    assert sequence_identity(a[10:17], a) == pytest.approx(7 / 30)  # a short peptide counts as 30 long
    assert sequence_identity("PFLI", "PFLV") == 0.75
    x, y = TIE_BREAK_ENTRIES[0][0], TIE_BREAK_ENTRIES[1][0]
    assert sequence_identity(x, y) == sequence_identity(y, x)  # symmetric, whatever the aligner's tie-break

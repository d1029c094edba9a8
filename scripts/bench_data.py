"""Data loading time: `AffinityDataset.from_csv` over the 25 fixture chains
(shared/fixtures/structures/chains): parse, featurise (template from the structure, pocket mask),
pad to buckets. Prints the import time, then the load time of each repeat and the best.
Then the fixture PDBbind folder (shared/fixtures/pdbbind): index, layout, ligands read with
RDKit and featurised (padded to atom buckets), and the pocket mask from the ligand file (with the
protein parse timed apart).

    python scripts/bench_data.py [--repeats 3] [--no-templates] [--no-pdbbind]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHAINS = ROOT.parent / "shared" / "fixtures" / "structures" / "chains"
PDBBIND = ROOT.parent / "shared" / "fixtures" / "pdbbind"


def bench_pdbbind(repeats: int) -> None:
    """Index + layout + ligand reading / features + pocket mask of the fixture PDBbind folder."""
    from molfun_jax.data import DataError, parse_structure
    from molfun_jax.data.ligand import ligand_features, ligand_pocket_mask, read_ligand
    from molfun_jax.data.pdbbind import read_index, resolve_entry

    t_index, t_ligand, t_protein, t_pocket = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        entries, _ = read_index(PDBBIND / "INDEX_general_PL_data.2016")
        files, bad = [], []
        for e in entries:
            try:
                files.append(resolve_entry(PDBBIND, e.pdb_id))
            except DataError as err:
                bad.append(f"{e.pdb_id}: {err}")
        t_index.append(time.perf_counter() - t0)
        tl = tp = tk = 0.0
        n_atoms, partial = 0, 0
        for f in files:
            t0 = time.perf_counter()
            lig = read_ligand(f.ligand, f.ligand_fallback)
            feats = ligand_features(lig)
            tl += time.perf_counter() - t0
            n_atoms += lig.num_atoms
            partial += lig.sanitized == "partial"
            t0 = time.perf_counter()
            parsed = parse_structure(f.protein)
            tp += time.perf_counter() - t0
            t0 = time.perf_counter()
            ligand_pocket_mask(parsed["atom_positions"], parsed["atom_mask"], feats["ligand_positions"][:lig.num_atoms])
            tk += time.perf_counter() - t0
        t_ligand.append(tl)
        t_protein.append(tp)
        t_pocket.append(tk)
    print(f"pdbbind: {len(entries)} index entries, {len(files)} with files ({len(bad)} bad: {'; '.join(bad)}), "
          f"{n_atoms} ligand heavy atoms, {partial} partially sanitised")
    print(f"pdbbind best of {repeats}: index + layout {1e3 * min(t_index):.1f} ms; ligands read + featurised "
          f"{1e3 * min(t_ligand):.0f} ms ({1e3 * min(t_ligand) / len(files):.0f} ms per ligand); pocket mask "
          f"{1e3 * min(t_pocket):.1f} ms; (protein parse {1e3 * min(t_protein):.0f} ms, unchanged)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-templates", action="store_true", help="features without the structure template")
    ap.add_argument("--no-pdbbind", action="store_true", help="skip the PDBbind folder")
    args = ap.parse_args()
    if not CHAINS.is_dir():
        sys.exit(f"fixtures not found: {CHAINS}")

    t0 = time.perf_counter()
    from molfun_jax.data import AffinityDataset, FeatureConfig
    t_import = time.perf_counter() - t0

    ids = sorted(p.name[:-len(".pdb.gz")] for p in CHAINS.glob("*.pdb.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "chains.csv"
        csv.write_text("pdb_id,affinity\n" + "".join(f"{pdb_id},{i * 0.1:.1f}\n" for i, pdb_id in enumerate(ids)))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ds = AffinityDataset.from_csv(csv, CHAINS, features=FeatureConfig(templates=not args.no_templates))
            times.append(time.perf_counter() - t0)
    n_res = sum(e.n_res for e in ds.entries)
    print(f"import molfun_jax.data: {t_import:.2f} s")
    print(f"from_csv: {len(ds)} chains, {n_res} residues, buckets "
          f"{ {b: len(ix) for b, ix in ds.buckets().items()} }, {len(ds.bad)} bad")
    print("load times: " + ", ".join(f"{t:.2f} s" for t in times) + f"; best {min(times):.2f} s "
          f"({1e3 * min(times) / len(ds):.0f} ms per chain)")
    if not args.no_pdbbind and PDBBIND.is_dir():
        bench_pdbbind(args.repeats)


if __name__ == "__main__":
    main()

"""Data loading time: `AffinityDataset.from_csv` over the 25 fixture chains
(shared/fixtures/structures/chains): parse, featurise (template from the structure, pocket mask),
pad to buckets. Prints the import time, then the load time of each repeat and the best.

    python scripts/bench_data.py [--repeats 3] [--no-templates]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-templates", action="store_true", help="features without the structure template")
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


if __name__ == "__main__":
    main()

"""Full-model forward: molfun_jax (JAX, jit) vs OpenFold (PyTorch) side by side, same weights,
same features of a real chain. Prints compile time, forward time, peak memory and the ratios.

    python scripts/bench_model.py [--preset model_1_ptm] [--chain 2gu3A] [--recycles 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import importlib.util  # noqa: F401  (openfold.config needs it)
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="model_1_ptm")
    ap.add_argument("--chain", default="2gu3A", help="fixture chain (shared/fixtures/structures/chains)")
    ap.add_argument("--recycles", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-torch", action="store_true", help="skip the OpenFold side")
    args = ap.parse_args()

    from molfun_jax.config import model_config
    from molfun_jax.data import make_features, parse_structure
    from molfun_jax.model import AlphaFold

    cfg = model_config(args.preset)
    cfg.globals.num_recycles = args.recycles
    cfg.globals.dtype = args.dtype
    path = ROOT.parent / "shared" / "fixtures" / "structures" / "chains" / f"{args.chain}.pdb.gz"
    feats = {k: np.asarray(v) for k, v in make_features(parse_structure(path)).items()}
    n = feats["aatype"].shape[0]
    print(f"device: {jax.devices()[0].device_kind}; preset {args.preset}; {args.chain} N={n}; "
          f"{args.recycles} recycles; dtype {args.dtype}")

    ref_model = None
    if not args.no_torch:
        import torch
        from openfold.model.model import AlphaFold as OFAlphaFold
        from tests.test_model import openfold_config, to_openfold_batch
        from tests.reference import randomize_
        from convert.torch_to_flax import torch_to_flax
        torch.manual_seed(0)
        ref_model = randomize_(OFAlphaFold(openfold_config(cfg)))
        params = torch_to_flax(ref_model.state_dict(), cfg)
    else:
        params = AlphaFold(cfg).init(jax.random.PRNGKey(0), feats)["params"]

    fwd = jax.jit(lambda p, f: AlphaFold(cfg).apply({"params": p}, f)["single"])
    t0 = time.perf_counter()
    compiled = fwd.lower(params, feats).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        compiled(params, feats).block_until_ready()
        times.append(time.perf_counter() - t0)
    t_jax = min(times)
    print(f"jax   : compile {t_compile:.1f} s, forward {t_jax:.2f} s (best of {args.repeats}), "
          f"XLA temp buffers {temp:.2f} GiB, process peak RSS {rss_gib():.2f} GiB")

    if ref_model is not None:
        import torch
        batch = to_openfold_batch(feats, args.recycles + 1)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                ref_model(batch)
            times.append(time.perf_counter() - t0)
        t_torch = min(times)
        print(f"torch : forward {t_torch:.2f} s (best of {args.repeats}), process peak RSS {rss_gib():.2f} GiB")
        print(f"ratio : openfold / molfun_jax forward time = {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    main()

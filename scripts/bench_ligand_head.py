"""The ligand-aware head's size and cost next to the trunk, at model_1_ptm widths (c_s = 384):
its parameter count, the jitted forward + backward time of the head alone on a real complex
(4x6p: the residues nearest the ligand, a 64-atom ligand bucket), and one model_1_ptm forward
(random weights, no recycling) at the same number of residues, as the trunk's share of a LoRA
step (whose backward costs about twice its forward). Runs in well under 3 minutes on a CPU.

    python scripts/bench_ligand_head.py [--n-res 64] [--repeats 5] [--no-trunk]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PDBBIND = ROOT.parent / "shared" / "fixtures" / "pdbbind"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-res", type=int, default=64, help="residues (the trunk's crop)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-trunk", action="store_true", help="skip the model_1_ptm forward")
    args = ap.parse_args()

    from molfun_jax.config import model_config
    from molfun_jax.data import crop_features, crop_indices, ligand_distance, make_features, parse_structure
    from molfun_jax.data.ligand import ligand_features, ligand_pocket_mask, read_ligand
    from molfun_jax.heads import LIGAND_HEAD_INPUT_KEYS, LigandAffinityHead, LigandHeadConfig

    cfg = model_config("model_1_ptm")
    c_s = cfg.model.evoformer_stack.c_s
    parsed = parse_structure(PDBBIND / "4x6p" / "4x6p_protein.pdb")
    lig = read_ligand(PDBBIND / "4x6p" / "4x6p_ligand.sdf")
    idx = crop_indices(len(parsed["aatype"]), args.n_res, "spatial", ligand_distance({**parsed, "ligand_positions":
                                                                                      lig.positions}))
    ex = {"all_atom_positions": parsed["atom_positions"][idx], "all_atom_mask": parsed["atom_mask"][idx],
          **ligand_features(lig, n_atoms=64)}
    ex["pocket_mask"] = ligand_pocket_mask(ex["all_atom_positions"], ex["all_atom_mask"], lig.positions)
    n = len(idx)
    single = jnp.asarray(np.random.default_rng(0).normal(size=(n, c_s)), jnp.float32)
    seq_mask = jnp.ones(n, jnp.float32)
    head_cfg = LigandHeadConfig()
    head = LigandAffinityHead(head_cfg)
    kw = {k: jnp.asarray(ex[k]) for k in LIGAND_HEAD_INPUT_KEYS}
    params = head.init(jax.random.PRNGKey(0), single, seq_mask, ex["pocket_mask"], **kw)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def loss(p, s):
        return jnp.square(head.apply(p, s, seq_mask, ex["pocket_mask"], **kw) - 1.0)

    # gradient w.r.t. the head params and the single representation (as in a LoRA step)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t_head = best_time(grad, params, single, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind}; 4x6p, {n} residues ({int(ex['pocket_mask'].sum())} in the "
          f"pocket), {int(ex['ligand_mask'].sum())} ligand atoms in a {len(ex['ligand_mask'])}-atom bucket")
    print(f"ligand head (c_s={c_s}, {head_cfg.to_dict()}): {n_params:,} params; forward+backward "
          f"{1e3 * t_head:.1f} ms (best of {args.repeats})")
    if args.no_trunk:
        return

    from molfun_jax.model import AlphaFold
    cfg.globals.num_recycles = 0
    chain = parse_structure(ROOT.parent / "shared" / "fixtures" / "structures" / "chains" / "2gu3A.pdb.gz")
    feats = make_features(chain)
    keep = np.arange(min(n, len(chain["aatype"])))
    feats = {k: jnp.asarray(v) for k, v in crop_features(feats, keep).items()}
    model = AlphaFold(cfg)
    # random weights of the right shapes (the forward time does not depend on their values;
    # compiling `init` would cost more than the forward)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), feats)["params"]
    trunk_params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
    fwd = jax.jit(lambda p, f: model.apply({"params": p}, f)["single"])
    t0 = time.perf_counter()
    compiled = fwd.lower(trunk_params, feats).compile()
    t_compile = time.perf_counter() - t0
    t_trunk = best_time(compiled, trunk_params, feats, repeats=1)
    n_trunk = sum(x.size for x in jax.tree_util.tree_leaves(trunk_params))
    step = 3 * t_trunk
    print(f"model_1_ptm trunk ({n_trunk:,} params; compile {t_compile:.0f} s): forward "
          f"{1e3 * t_trunk:.0f} ms at N={len(keep)}, no recycling; a LoRA step ~ 3x forward = {1e3 * step:.0f} ms")
    print(f"head share of a LoRA step: {100 * t_head / (step + t_head):.2f} % of time, "
          f"{100 * n_params / (n_trunk + n_params):.2f} % of params")


if __name__ == "__main__":
    main()

"""One-GPU readiness check (one H100/H200, <= 8 minutes), printed as one table:

1. bf16 vs fp32 parity of the full model (model_1_ptm, random non-zero weights) on a real chain:
   max |bf16 - fp32| / max |fp32| of the single and pair representations and the atom positions.
2. LoRA train step (rank 8 on q, v) at N=256 and 384 in bf16: time per step (median of 3 after a
   warm-up) and against the forward's (the issue's step/forward ratio, and the same ratio of
   their matmul FLOPs: the floor if both ran at one FLOP rate), peak device memory (`jax` memory
   stats), utilisation: the step's matmul FLOPs (remat's recompute included; counted from the
   compiled HLO, each loop iteration once) / time / the GPU's dense bf16 peak.
3. Head-only: one epoch on a cached trunk output against one epoch through the trunk.

Each row prints as soon as it is measured, so a run cut off by its time limit keeps what it
measured; a part that fails (e.g. out of device memory) gets a FAILED row with the error's last
line, the other parts still run, and the exit status is 1.

    python scripts/gpu_check.py            # on the GPU
    JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache python scripts/gpu_check.py   # a rerun there skips the compiles
    python scripts/gpu_check.py --smoke    # tiny preset, small N: runs anywhere (CPU), end to end
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scripts.bench_train_step import dot_flops, forward_program, time_step_and_forward  # noqa: E402
from tests.finetune_common import random_params  # noqa: E402

# dense bf16 peak FLOP/s by device kind (vendor data sheets, SXM); utilisation is left out elsewhere
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def chain_features(chain: str, n: int) -> dict[str, np.ndarray]:
    from molfun_jax.data import make_features, parse_structure
    from molfun_jax.data.buckets import crop_features, pad_features
    path = ROOT.parent / "shared" / "fixtures" / "structures" / "chains" / f"{chain}.pdb.gz"
    if not path.exists():
        raise SystemExit(f"{path}: fixture missing")
    feats = {k: np.asarray(v) for k, v in make_features(parse_structure(path)).items()}
    n_res = feats["aatype"].shape[0]
    feats = crop_features(feats, np.arange(min(n, n_res)))
    return pad_features(feats, n) if n > n_res else feats  # padded residues are masked out


def parity(cfg, params, feats) -> dict[str, float]:
    from molfun_jax.model import AlphaFold
    from molfun_jax.training import with_dtype

    def run(dtype):
        c = with_dtype(cfg, dtype)
        out = jax.jit(lambda p, f: AlphaFold(c).apply({"params": p}, f))(params, feats)
        return {k: np.asarray(out[k], np.float32) for k in ("single", "pair", "final_atom_positions")}

    ref, low = run("float32"), run("bfloat16")
    res = feats["seq_mask"] > 0  # valid residues only
    pick = {"single": lambda x: x[res], "pair": lambda x: x[res][:, res],
            "final_atom_positions": lambda x: x[res] * feats["atom37_atom_exists"][res][..., None]}
    return {k: float(np.abs(pick[k](low[k]) - pick[k](ref[k])).max() / np.abs(pick[k](ref[k])).max())
            for k in ref}


def setup(cfg, params, strategy) -> tuple:
    """(model, variables, plan, tx, mesh, step) of `strategy` (bf16 under amp) on one device."""
    from molfun_jax.heads import HeadConfig
    from molfun_jax.training import AffinityModel, data_mesh, make_train_step, with_dtype
    model = AffinityModel(with_dtype(cfg, strategy.compute_dtype), HeadConfig())
    variables = model.init_variables(params, strategy, jax.random.PRNGKey(0))
    plan = strategy.plan(variables)
    tx = plan.optimizer(100)
    mesh = data_mesh(jax.devices()[:1])
    return model, variables, plan, tx, mesh, make_train_step(model, plan, tx, mesh)


def fresh_state(plan, variables, tx, mesh) -> tuple:
    from molfun_jax.training import init_state, replicate
    state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(1))
    return replicate(state, mesh), replicate(frozen, mesh)


def lora_step(cfg, params, feats, repeats: int) -> dict[str, float | None]:
    from molfun_jax.training import LoRA, make_batches, shard_batch
    model, variables, plan, tx, mesh, step = setup(cfg, params, LoRA(amp=True))
    state, frozen = fresh_state(plan, variables, tx, mesh)
    ex = dict(feats, target=np.float32(0.5))
    batch = shard_batch(make_batches([ex], 1, 1)[0], mesh, 1)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    t_compile = time.perf_counter() - t0
    flops = dot_flops(compiled.as_text())
    state, m = compiled(state, frozen, batch)  # warm-up
    loss = float(m["loss"])
    peak_gib = peak_memory_gib()  # the step's: the forward timed with it below needs less
    forward = forward_program(model, plan, state, frozen, ex)
    forward_flops = dot_flops(forward[0].as_text())
    state, step, forward_s = time_step_and_forward(compiled, state, frozen, batch, forward, repeats)
    peak = peak_flops()
    return {"compile_s": t_compile, "step_s": step, "peak_gib": peak_gib, "gflop": flops / 1e9,
            "util": flops / step / peak if peak and flops else None, "loss": loss,
            "forward_s": forward_s, "flop_ratio": flops / forward_flops if forward_flops else None}


def head_only_epochs(cfg, params, feats_list) -> dict[str, float]:
    """One epoch through the trunk and one on the cached trunk outputs (compile excluded: each
    runs a first epoch before the timed one), and the one-off cost of the cache (its forward
    passes, compile included: `cache_trunk` jits its own forward)."""
    from molfun_jax.training import HeadOnly, make_batches, shard_batch
    from molfun_jax.training.fit import cache_trunk
    model, variables, plan, tx, mesh, step = setup(cfg, params, HeadOnly(amp=True))
    examples = [dict(f, target=np.float32(i % 3 - 1)) for i, f in enumerate(feats_list)]

    def epoch(exs) -> float:
        state, frozen = fresh_state(plan, variables, tx, mesh)
        t0 = time.perf_counter()
        for b in make_batches(exs, 1, 1):
            state, m = step(state, frozen, shard_batch(b, mesh, 1))
        jax.block_until_ready(m)
        return time.perf_counter() - t0

    epoch(examples)
    t_uncached = epoch(examples)
    t0 = time.perf_counter()
    cached = cache_trunk(model, variables, examples, 1, mesh)
    t_cache = time.perf_counter() - t0
    epoch(cached)
    return {"uncached_s": t_uncached, "cache_s": t_cache, "cached_s": epoch(cached)}


class Table:
    """The check's rows (label, value), each printed as it is added; `part` turns an exception
    in a part of the check into a FAILED row and goes on."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.failed = False

    def add(self, label: str, value: str) -> None:
        self.rows.append((label, value))
        print(f"{label} | {value}", flush=True)

    @contextlib.contextmanager
    def part(self, label: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported as a row; the other parts still run
            traceback.print_exc()
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            self.add(label, f"FAILED: {type(e).__name__}: {lines[-1] if lines else ''}")
            self.failed = True

    def text(self) -> str:
        w = max(len(k) for k, _ in self.rows)
        return "\n".join(f"{k:<{w}} | {v}" for k, v in self.rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny preset, small N (CPU end-to-end check)")
    ap.add_argument("--chain", default="2gu3A")
    ap.add_argument("--n", default=None, help="LoRA step crop sizes (default 256,384; smoke 16,24)")
    args = ap.parse_args()

    from molfun_jax.config import model_config
    preset = "tiny" if args.smoke else "model_1_ptm"
    ns = [int(x) for x in (args.n or ("16,24" if args.smoke else "256,384")).split(",")]
    n_parity, n_head, n_examples, repeats = (16, 16, 2, 1) if args.smoke else (128, 128, 8, 3)
    cfg = model_config(preset, train=True)
    cfg.globals.num_recycles = 0
    t_start = time.perf_counter()
    params = random_params(cfg)  # non-zero random weights (AlphaFold's init zeroes output layers)
    table = Table()
    table.add("device", f"{jax.devices()[0].device_kind} x{jax.device_count()}")
    table.add("preset", f"{preset}, chain {args.chain}, 0 recycles")

    with table.part(f"bf16 vs fp32 N={n_parity}"):
        for k, v in parity(cfg, params, chain_features(args.chain, n_parity)).items():
            table.add(f"bf16 vs fp32 N={n_parity}: {k}", f"{v:.2e} rel")
    for n in ns:
        label = f"LoRA bf16 N={n}"
        with table.part(label):
            r = lora_step(cfg, params, chain_features(args.chain, n), repeats)
            mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
            util = "-" if r["util"] is None else f"{100 * r['util']:.1f}%"
            flop_ratio = "-" if r["flop_ratio"] is None else f"{r['flop_ratio']:.2f}x"
            table.add(label,
                      f"step {r['step_s']:.3f} s = {r['step_s'] / r['forward_s']:.2f}x the forward's "
                      f"{r['forward_s']:.3f} s (matmul FLOPs {flop_ratio}), compile {r['compile_s']:.1f} s, "
                      f"peak {mem}, {r['gflop']:.4g} GFLOP, utilisation {util}, loss {r['loss']:.3g}")
    label = f"head-only epoch, {n_examples} x N={n_head}"
    with table.part(label):
        h = head_only_epochs(cfg, params, [chain_features(args.chain, n_head)] * n_examples)
        table.add(label, f"uncached {h['uncached_s']:.3f} s, cached {h['cached_s']:.3f} s "
                         f"({h['uncached_s'] / max(h['cached_s'], 1e-9):.0f}x); cache once {h['cache_s']:.1f} s "
                         f"incl. compile")
    table.add("total wall time", f"{time.perf_counter() - t_start:.0f} s")
    print("\n" + table.text())
    sys.exit(1 if table.failed else 0)


if __name__ == "__main__":
    main()

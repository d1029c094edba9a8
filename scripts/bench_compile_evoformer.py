"""Compile time of the Evoformer stack vs depth: with `nn.scan` one block is compiled once, so
lower+compile time should barely depend on the number of blocks.

    python scripts/bench_compile_evoformer.py [--blocks 4 48] [--n-res 32] [--n-seq 8] [--grad]

Full model_1_ptm widths; random inputs; prints lower, compile and first-run times per depth and
the deepest/shallowest ratios. `--grad` times value_and_grad (with remat, as in training) instead
of the forward pass. Runs on CPU unless `--platform` says otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 48])
    ap.add_argument("--n-res", type=int, default=32)
    ap.add_argument("--n-seq", type=int, default=8)
    ap.add_argument("--preset", default="model_1_ptm")
    ap.add_argument("--grad", action="store_true", help="time value_and_grad with remat instead of the forward")
    ap.add_argument("--platform", default="cpu")
    args = ap.parse_args(argv)

    import jax
    jax.config.update("jax_platforms", args.platform)
    import jax.numpy as jnp

    from molfun_jax.config import model_config
    from molfun_jax.model.evoformer import EvoformerStack

    cfg = model_config(args.preset)
    ev = cfg.model.evoformer_stack
    s, n = args.n_seq, args.n_res
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    inputs = (jax.random.normal(keys[0], (s, n, ev.c_m)), jax.random.normal(keys[1], (n, n, ev.c_z)),
              jnp.ones((s, n)), jnp.ones((n, n)))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {args.preset} widths, "
          f"N_seq={s}, N_res={n}; {'value_and_grad (remat)' if args.grad else 'forward'}")
    rows = []
    for no_blocks in args.blocks:
        mod = EvoformerStack.from_config(ev, cfg.globals, no_blocks=no_blocks, remat=args.grad)
        params = jax.jit(mod.init)(jax.random.PRNGKey(1), *inputs)
        if args.grad:
            def fn(p):
                return jax.value_and_grad(lambda p_: sum(jnp.sum(o ** 2) for o in mod.apply(p_, *inputs)))(p)
        else:
            def fn(p):
                return mod.apply(p, *inputs)
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(params)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        jax.block_until_ready(compiled(params))
        t3 = time.perf_counter()
        jax.block_until_ready(compiled(params))
        t4 = time.perf_counter()
        rows.append((no_blocks, t1 - t0, t2 - t1, t3 - t2, t4 - t3))
        print(f"{no_blocks:3d} blocks: lower {t1 - t0:6.2f} s  compile {t2 - t1:6.2f} s  "
              f"first run {t3 - t2:6.2f} s  second run {t4 - t3:6.2f} s", flush=True)
        del params, compiled, lowered
    if len(rows) > 1:
        (b0, l0, c0, r0, _), (b1, l1, c1, r1, _) = rows[0], rows[-1]
        print(f"ratio {b1} / {b0} blocks: lower+compile {(l1 + c1) / (l0 + c0):.2f}x, "
              f"first run {r1 / r0:.2f}x (depth ratio {b1 / b0:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

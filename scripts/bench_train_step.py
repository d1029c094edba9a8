"""Train step: molfun_jax (JAX, jit) vs the equivalent OpenFold (PyTorch) step, side by side.

Each side runs in its own process (peak RSS is per side). Both get the same randomised OpenFold
weights (converted with `convert.torch_to_flax`), the same LoRA adapters (rank 8 on the
Evoformer's `linear_q`/`linear_v`; on OpenFold's side wrappers around those Linears), the same
affinity head (mean pooling, dropout off) and MSE loss, one example of a real chain cropped to
N, 0 recycles, trunk dropout off. OpenFold's block checkpointing is made non-reentrant
(`torch.utils.checkpoint(use_reentrant=False)`; the reentrant default gives the adapters no
gradient under a frozen trunk). The first step's loss and gradient norm must agree.

    python scripts/bench_train_step.py [--strategies lora,partial,full] [--n 64,128] [--remat on,off]
    python scripts/bench_train_step.py --compile-only [--n 128,256,384,512]   # XLA memory plans
    python scripts/bench_train_step.py --strategies partial,partial_unsplit --sides ours --remat on
        # partial_unsplit: Partial back-propagating through every block (the path before the split)
    python scripts/bench_train_step.py --blocks 4 --strategies lora --remat on --sides ours --profile /tmp/prof
        # 4 Evoformer blocks on both sides (the per-block cost); XLA op time of one traced step by
        # module, by op kind (batched matmuls and GEMMs with their FLOP rates, or which other
        # fusion) and by op; the trace and the step's HLO (hlo.txt) stay in the folder. With
        # --forward, the forward program is traced too (DIR/forward) and each module's step time,
        # by phase, is set against its time there
    ... --inputs /tmp/in48   # keep the written inputs there and reuse them in later invocations
        # (refused when they were written for another --preset, --seed or --blocks)
    ... --rounds 3   # each row's two sides 3 times, alternating: medians, and each round's speed
    ... --compile-cache /tmp/xla   # ours as a rerun of `train.py`: the step loaded from XLA's cache

Time is the median of `--repeats` steps after one warm-up step. With `--forward`, the LoRA rows
also time the forward alone, alternating with `--repeats` more steps (the step/forward time
ratio is of those), and print the step/forward ratio of matmul FLOPs, counted from the compiled
HLO (`dot_flops`): the time ratio's floor if the step's backward ran at the forward's FLOP rate. Our
side runs as `fit` under the CLI does: CPU computations on the calling thread, steps reusing
their buffers' pages (`training.memory`).
"""
from __future__ import annotations

import argparse
import importlib.util  # noqa: F401  (openfold.config needs it)
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RANK, ALPHA, LORA_TARGETS = 8, 16.0, ("linear_q", "linear_v")
TARGET = 0.5
LR = 1e-4
PARTIAL_N = 4  # Partial trains the last 4 Evoformer blocks


def peak_rss_gib() -> float:
    """Peak RSS (VmHWM) since the process started or since the last `reset_peak_rss`, GiB."""
    kb = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith("VmHWM:"))
    return int(kb) / 2**20


def reset_peak_rss() -> float:
    """The peak RSS so far (setup: loading weights, compiling), GiB; then the kernel's peak count
    (VmHWM, and with it getrusage's ru_maxrss) restarts from the current RSS (Linux clear_refs),
    so the next `peak_rss_gib` is what the steps hold: weights, optimizer state, activations."""
    setup = peak_rss_gib()
    Path("/proc/self/clear_refs").write_text("5")
    return setup


def peak_rss(setup_gib: float) -> dict:
    """Whole-process peak RSS (setup or steps, whichever is higher) and the steps' own, GiB."""
    steps = peak_rss_gib()
    return {"rss_gib": max(setup_gib, steps), "steps_rss_gib": steps}


def chain_features(chain: str, n: int, tile: bool = False) -> dict[str, np.ndarray]:
    """The chain's features cropped to its first n residues; `tile`: a shorter chain is repeated
    up to n (only the shapes matter, for the compile-only memory plans)."""
    from molfun_jax.data import make_features, parse_structure
    from molfun_jax.data.buckets import crop_features
    path = ROOT.parent / "shared" / "fixtures" / "structures" / "chains" / f"{chain}.pdb.gz"
    feats = {k: np.asarray(v) for k, v in make_features(parse_structure(path)).items()}
    n_res = feats["aatype"].shape[0]
    if n > n_res and not tile:
        raise SystemExit(f"{path}: chain has {n_res} residues, cannot crop to N={n}")
    return crop_features(feats, np.arange(n) % n_res)


def bench_config(preset: str, remat: bool, dtype: str = "float32", policy: str | None = None,
                 blocks: int | None = None, chunk_size: int | None = None):
    from molfun_jax.config import model_config
    cfg = model_config(preset, train=True)
    cfg.globals.num_recycles = 0
    if blocks is not None:  # fewer Evoformer blocks (both sides) to iterate on the per-block cost
        cfg.model.evoformer_stack.no_blocks = blocks
    cfg.globals.remat = remat
    cfg.globals.dtype = dtype
    if policy is not None:
        cfg.globals.remat_policy = policy
    cfg.globals.chunk_size = chunk_size
    return cfg


# --- shared inputs (written once by the parent) --------------------------------------------------
def write_inputs(preset: str, seed: int, folder: Path, blocks: int | None = None) -> None:
    """OpenFold's randomised state dict, its Flax conversion, LoRA adapters (b random, so `a`
    gets a gradient too) and head params, as files both sides read."""
    import jax
    import torch
    from flax import traverse_util
    from openfold.model.model import AlphaFold as OFAlphaFold

    from convert.torch_to_flax import torch_to_flax
    from molfun_jax.heads import HeadConfig
    from molfun_jax.lora import LoRAConfig, init_lora
    from molfun_jax.training import AffinityModel
    from tests.reference import randomize_
    from tests.test_model import openfold_config

    cfg = bench_config(preset, remat=False, blocks=blocks)
    torch.manual_seed(seed)
    ref = randomize_(OFAlphaFold(openfold_config(cfg)), seed)
    torch.save(ref.state_dict(), folder / "openfold.pt")
    trunk = torch_to_flax(ref.state_dict(), cfg)
    del ref
    k_lora, k_b, k_head = jax.random.split(jax.random.PRNGKey(seed), 3)
    lora = init_lora(trunk, LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=LORA_TARGETS), k_lora)
    flat_lora = traverse_util.flatten_dict(lora)
    for i, p in enumerate(p for p in flat_lora if p[-1] == "b"):
        flat_lora[p] = 0.02 * jax.random.normal(jax.random.fold_in(k_b, i), flat_lora[p].shape)
    head = AffinityModel(cfg, HeadConfig(dropout=0.0, pooling="mean")).init_variables(
        trunk, _strategy("partial"), k_head)["head"]
    tree = {"trunk": trunk, "head": head, "lora": traverse_util.unflatten_dict(flat_lora)}
    np.savez(folder / "variables.npz",
             **{"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()})
    (folder / INPUTS_META).write_text(json.dumps(inputs_meta(preset, seed, blocks)))


INPUTS_META = "inputs.json"


def inputs_meta(preset: str, seed: int, blocks: int | None) -> dict:
    """What an inputs folder's weights were written for (`write_inputs`)."""
    return {"preset": preset, "seed": seed, "blocks": blocks}


def check_inputs(folder: Path, preset: str, seed: int, blocks: int | None) -> None:
    """Refuse to reuse an inputs folder written for another preset, seed or block count, whose
    weights would not fit the model both sides build (SystemExit naming the folder and the field)."""
    meta = folder / INPUTS_META
    if not meta.exists():
        raise SystemExit(f"{folder}: has variables.npz but no {INPUTS_META} (written by an older benchmark); "
                         f"remove the folder or pass another --inputs")
    want, got = inputs_meta(preset, seed, blocks), json.loads(meta.read_text())
    diff = [f"{k}={got.get(k)!r} (asked {v!r})" for k, v in want.items() if got.get(k) != v]
    if diff:
        raise SystemExit(f"{folder}: inputs written for {', '.join(diff)}; pass another --inputs")


def load_variables(folder: Path, with_lora: bool) -> dict:
    from flax import traverse_util
    with np.load(folder / "variables.npz") as f:
        tree = traverse_util.unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})
    tree.setdefault("lora", {})
    if not with_lora:
        tree["lora"] = {}
    return tree


def _strategy(name: str):
    from molfun_jax.training import Full, LoRA, Partial
    return {"lora": lambda: LoRA(rank=RANK, alpha=ALPHA, target_modules=LORA_TARGETS, amp=False),
            "partial": lambda: Partial(unfreeze_last_n=PARTIAL_N, amp=False),
            "partial_unsplit": lambda: Partial(unfreeze_last_n=PARTIAL_N, amp=False),
            "full": lambda: Full(amp=False)}[name]()


# --- our side ------------------------------------------------------------------------------------
def run_ours(job: dict, folder: Path) -> dict:
    import jax
    from molfun_jax.heads import HeadConfig
    from molfun_jax.training import (AffinityModel, data_mesh, init_state, make_batches, make_train_step,
                                     release_host_memory, replicate, reusing_host_buffers, shard_batch,
                                     synchronous_cpu_dispatch)
    synchronous_cpu_dispatch()  # before any JAX use, as the CLI does
    if job.get("compile_cache"):  # as `train.py` does by default
        from molfun_jax.cli.common import enable_compilation_cache
        os.environ["MOLFUN_JAX_CACHE"] = job["compile_cache"]
        enable_compilation_cache()

    cfg = bench_config(job["preset"], job["remat"], job["dtype"], job.get("policy"), job.get("blocks"),
                       job.get("chunk_size"))
    strategy = _strategy(job["strategy"])
    variables = load_variables(folder, job["strategy"] == "lora")
    split = {"frozen_blocks": 0} if job["strategy"] == "partial_unsplit" else {}
    model = AffinityModel(cfg, HeadConfig(dropout=0.0, pooling="mean"), **split)
    plan = strategy.plan(variables)
    tx = plan.optimizer(100)
    mesh = data_mesh()
    state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(0))
    state, frozen = replicate(state, mesh), replicate(frozen, mesh)
    del variables
    ex = dict(chain_features(job["chain"], job["n"], tile=bool(job.get("compile_only"))), target=np.float32(TARGET))
    batch = shard_batch(make_batches([ex], 1, 1)[0], mesh, 1)
    step = make_train_step(model, plan, tx, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    compiled = lowered.compile()
    out = {"compile_s": time.perf_counter() - t0, **memory_plan(compiled)}
    if job.get("compile_only"):
        return out
    times = []
    release_host_memory()  # as `fit` does after a compile
    setup_gib = reset_peak_rss()
    with reusing_host_buffers():  # as `fit` does from its first compile on
        for i in range(job["repeats"] + 1):
            if i == 1:
                faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
            if i == 0:
                out.update(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]))
        out.update(step_s=statistics.median(times[1:]), **peak_rss(setup_gib),
                   faults=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / job["repeats"])
        forward = None
        if job.get("forward"):  # after the peak RSS: the HLO text and its parse are not the step's memory
            forward = forward_program(model, plan, state, frozen, ex)
            state, out["paired_step_s"], out["forward_s"] = time_step_and_forward(compiled, state, frozen, batch,
                                                                                  forward, job["repeats"])
            out["flops"], out["forward_flops"] = dot_flops(compiled.as_text()), dot_flops(forward[0].as_text())
        if job.get("profile"):  # last: the traced step donates `state`
            out["top_ops"] = profile_step(compiled, state, frozen, batch, job["profile"], forward=forward)
    return out


MODULES = ("msa_att_row", "msa_att_col", "msa_transition", "outer_product_mean", "tri_mul_out", "tri_mul_in",
           "tri_att_start", "tri_att_end", "pair_transition")
STACKS = ("evoformer", "extra_msa_stack", "template_pair_stack")


def profile_step(compiled, state, frozen, batch, folder: str, top: int = 25,
                 forward: Optional[tuple[Any, dict]] = None) -> list:
    """One step under `jax.profiler.trace` (written to `folder` with the step's HLO, `hlo.txt`;
    opens in Perfetto/TensorBoard); XLA op time summed by (stack, module, forward | remat |
    backward), by op kind (`matmul_ops`' batched matmuls and GEMMs, with their FLOP rates, else
    the fusion's kind) and by op, each row [what, ms, share]. Ops are named from the HLO's
    op_name metadata, or (XLA:CPU drops it from some dots) from their operands' (`op_names`); the
    backward's recompute of a remat'ed block (`rematted_computation`) is its own phase, 'remat'.
    With `forward` (`forward_program`'s), the forward program is traced too (`folder`/forward),
    and each module's step time is set against its time there (`against_forward`)."""
    if forward is not None:  # first: the traced step donates `state`
        fwd_hlo, fwd_events = _trace(forward[0], (state["trainable"], frozen, forward[1]), Path(folder, "forward"))
    hlo, events = _trace(compiled, (state, frozen, batch), Path(folder))
    total = sum(e["dur"] for e in events) or 1.0
    matmuls, names = matmul_ops(hlo), op_names(hlo)
    by_part, by_op, by_kind, kind_flops = Counter(), Counter(), Counter(), Counter()
    for e in events:
        op = e["args"]["hlo_op"]
        stack, module, phase, where = names.get(op, _UNNAMED)
        by_part[(stack, module, phase)] += e["dur"]
        by_op[f"{op} ({where})"] += e["dur"]
        kind = matmuls[op][0] if op in matmuls else re.sub(r"[.\d]+$", "", op)
        by_kind[kind] += e["dur"]
        kind_flops[kind] += matmuls[op][1] if op in matmuls else 0.0
    kinds = Counter({_KINDS.get(k, k) + (f", {kind_flops[k] / by_kind[k] / 1e3:.0f} GFLOP/s" if k in _KINDS else ""): v
                     for k, v in by_kind.items()})
    rows = lambda c, n=top: [[k, round(v / 1e3, 1), round(v / total, 3)] for k, v in c.most_common(n)]
    out = (rows(Counter({" ".join(k): v for k, v in by_part.items()})) + [["--- by op kind", round(total / 1e3, 1), 1.0]]
           + rows(kinds, 8) + [["--- top ops", round(total / 1e3, 1), 1.0]] + rows(by_op))
    if forward is None:
        return out
    fwd_names, fwd_parts = op_names(fwd_hlo), Counter()
    for e in fwd_events:
        fwd_parts[fwd_names.get(e["args"]["hlo_op"], _UNNAMED)[:2]] += e["dur"]
    return out + against_forward(by_part, fwd_parts, top)


def _trace(compiled, args: tuple, folder: Path) -> tuple[str, list]:
    """`compiled(*args)` once under `jax.profiler.trace` into `folder`, its HLO beside (`hlo.txt`):
    (the HLO text, the trace's XLA op events)."""
    import gzip

    import jax
    hlo = compiled.as_text()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hlo.txt").write_text(hlo)
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        jax.block_until_ready(compiled(*args))
    trace = max(folder.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    return hlo, [e for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
                 if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def against_forward(step: Counter, forward: Counter, top: int = 25) -> list:
    """Rows [what, ms, share of the step] of each (stack, module), the step's largest first: its op
    time in the step by phase (`step`: (stack, module, phase) -> us) against the forward
    program's (`forward`: (stack, module) -> us), with the whole programs' totals first."""
    total, fwd_total = sum(step.values()) or 1.0, sum(forward.values())
    parts = Counter()
    for (stack, module, _), us in step.items():
        parts[(stack, module)] += us
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
    rows = [[f"--- by module, the step's phases against the forward program's time (forward program "
             f"{fwd_total / 1e3:.1f} ms; step {ratio(total, fwd_total)} that)", round(total / 1e3, 1), 1.0]]
    for (stack, module), us in parts.most_common(top):
        phases = ", ".join(f"{p} {step[(stack, module, p)] / 1e3:.1f}" for p in _PHASES if (stack, module, p) in step)
        rows.append([f"{stack} {module}: {phases} ms; forward program {forward[(stack, module)] / 1e3:.1f} ms, "
                     f"step {ratio(us, forward[(stack, module)])} that", round(us / 1e3, 1), round(us / total, 3)])
    return rows


_KINDS = {"gemm": "GEMM (matmul without batch dimensions)", "batched": "batched matmul (attention, triangle products)"}
_PHASES = ("fwd", "remat", "bwd")
_UNNAMED = ("other", "-", "fwd", "")  # an op `op_names` cannot place


def op_names(hlo_text: str) -> dict[str, tuple[str, str, str, str]]:
    """Each instruction of an optimised XLA module as (stack, module, phase, where), read from its
    op_name metadata: the Evoformer/extra-MSA/template stack and module in its path, the phase
    ('remat' in a remat'ed block's recompute, 'bwd' under a transpose, else 'fwd') and the path's
    last two parts. An instruction without op_name (XLA:CPU keeps only a stack frame on some dots)
    takes the stack and module of its first operand's nearest named producer (up to 4 back), and
    the latest phase of its operands' producers; its `where` says so."""
    named, operands = {}, {}
    for line in hlo_text.splitlines():
        d = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if d is None:
            continue
        op = d.group(1)
        path = re.search(r'op_name="([^"]*)"', line)
        if path:
            path = path.group(1)
            named[op] = (next((s for s in STACKS if f"/{s}" in path), "other"),
                         next((m for m in MODULES if f"/{m}/" in path), "-"),
                         "remat" if "rematted_computation" in path else "bwd" if "transpose(" in path else "fwd",
                         "/".join(path.split("/")[-2:]))
        else:
            args = line[d.end():].split("metadata=")[0]
            operands[op] = re.findall(r"%([\w.\-]+)", re.sub(r"(calls|to_apply|body|condition)=%?[\w.\-]+", "", args))

    def source(op: str, hops: int) -> Optional[tuple[str, str, str, str]]:
        """The nearest named producer of `op` within `hops` (depth first, operands in order)."""
        if op in named:
            return named[op]
        return next((n for a in operands.get(op, ()) if hops and (n := source(a, hops - 1))), None)

    def inherit(op: str) -> Optional[tuple[str, str, str, str]]:
        found = [n for a in operands[op] if (n := source(a, 3)) and n[1] != "-"]
        if not found:
            return None
        phase = max((n[2] for n in found), key=_PHASES.index)
        return found[0][0], found[0][1], phase, f"{found[0][1]} {phase}, from its operands"

    return {**{op: n for op in operands if (n := inherit(op))}, **named}


def memory_plan(compiled) -> dict:
    """XLA's buffer plan of a compiled computation, GiB (temporaries; arguments + outputs - aliased)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    g = 2**30
    return {"xla_temp_gib": m.temp_size_in_bytes / g,
            "xla_total_gib": (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                              - m.alias_size_in_bytes) / g}


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_DEFINED_SHAPE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \(?\w+\[([\d,]*)\]")
# a dot, or a library GEMM (cuBLAS custom-call on GPU) carrying dot dimension numbers
_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}|"lhs_contracting_dimensions":\[([^\]]*)\]')
_LHS = re.compile(r" (?:dot|custom-call)\((?:\w+\[([\d,]*)\]\S* )?%?([\w.\-]+)")
_BATCHED = re.compile(r'lhs_batch_dims=\{\d|"lhs_batch_dimensions":\["')


def _computations(hlo_text: str) -> tuple[Optional[str], dict[str, list[str]]]:
    """(the entry computation's name, each computation's instruction lines) of an HLO module."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif cur is not None:
            comps[cur].append(line)
    return entry, comps


def _matmul(line: str) -> tuple[Optional[re.Match], Optional[re.Match]]:
    """(contracting dims, lhs operand) of a dot or library GEMM instruction line; Nones otherwise."""
    contracting, lhs = _CONTRACTING.search(line), _LHS.search(line)
    return (contracting, lhs) if contracting and lhs else (None, None)


class _Flops:
    """Matmul FLOPs of an optimised XLA module's instructions and computations: 2 x output size x
    contracted size for each dot (or library GEMM), a while loop's body counted once per iteration
    (its `known_trip_count`), a conditional's costliest branch, a fusion's called computation."""

    def __init__(self, hlo_text: str):
        self.entry, self.comps = _computations(hlo_text)
        self.shapes = {m.group(1): _dims(m.group(2)) for lines in self.comps.values() for line in lines
                       if (m := _DEFINED_SHAPE.match(line))}
        self.memo: dict[str, float] = {}

    def computation(self, name: str) -> float:
        if name not in self.memo:
            self.memo[name] = sum(map(self.instruction, self.comps.get(name, ())))
        return self.memo[name]

    def instruction(self, line: str) -> float:
        contracting, lhs = _matmul(line)
        if contracting:
            out = _DEFINED_SHAPE.match(line)
            lhs_dims = _dims(lhs.group(1)) if lhs.group(1) is not None else self.shapes[lhs.group(2)]
            k = math.prod(lhs_dims[i] for i in _dims(contracting.group(1) or contracting.group(2)))
            return 2.0 * math.prod(_dims(out.group(2))) * k
        if " while(" in line:
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            return (int(trips.group(1)) if trips else 1) * self.computation(re.search(r"body=%?([\w.\-]+)", line).group(1))
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
            return max(self.computation(b.strip().lstrip("%")) for b in branches.group(1).split(","))
        return sum(self.computation(c) for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line))


def _dims(s: str) -> list[int]:
    return [int(x) for x in s.replace('"', "").split(",") if x.strip()]


def dot_flops(hlo_text: str) -> float:
    """The matmul FLOPs an optimised XLA module executes (`_Flops`: fused dots included, a loop's
    body once per iteration). XLA's `cost_analysis()` counts a loop's body once: for the scanned
    48-block trunk it reports about 1/34 of the step's FLOPs."""
    flops = _Flops(hlo_text)
    return flops.computation(flops.entry) if flops.entry else 0.0


def matmul_ops(hlo_text: str) -> dict[str, tuple[str, float]]:
    """The instructions of an optimised XLA module that run a matmul: dots, library GEMMs, and
    fusions whose fused computation holds one (XLA:CPU's YNNPACK fusions put a dot together with
    its elementwise producers and consumers), each as name -> (kind, FLOPs of one execution).
    kind is "batched" when a dot has batch dimensions (attention's and the triangle updates'
    many small products; XLA:CPU runs each such dot on one core), else "gemm"."""
    flops = _Flops(hlo_text)
    fused = {d.group(1): c.group(1) for lines in flops.comps.values() for line in lines
             if (d := _DEFINED_SHAPE.match(line)) and (c := re.search(r" fusion\(.*calls=%?([\w.\-]+)", line))}
    kind = lambda dots: "batched" if any(_BATCHED.search(line) for line in dots) else "gemm"
    out = {}
    for comp, lines in flops.comps.items():
        if comp in fused.values():  # a fusion's body runs as the fusion
            continue
        for line in lines:
            d = _DEFINED_SHAPE.match(line)
            if d is None:
                continue
            dots = [line] if _matmul(line)[0] else [f for f in flops.comps.get(fused.get(d.group(1)), ())
                                                      if _matmul(f)[0]]
            if dots:  # a fusion's FLOPs are its called computation's (`_Flops.instruction`)
                out[d.group(1)] = (kind(dots), flops.instruction(line))
    return out


def forward_program(model, plan, state, frozen, ex: dict) -> tuple[Any, dict]:
    """Our forward alone, the step's yardstick: trunk + head prediction of `ex` (its features
    without the labels), compiled; (the compiled forward, the features)."""
    import jax
    from molfun_jax.training.step import LABEL_KEYS
    feats = {k: v for k, v in ex.items() if k not in LABEL_KEYS}
    fwd = jax.jit(lambda t, f, x: model.predict(plan.combine(t, f), x))
    return fwd.lower(state["trainable"], frozen, feats).compile(), feats


def time_step_and_forward(compiled, state, frozen, batch, forward: tuple[Any, dict],
                          repeats: int) -> tuple[Any, float, float]:
    """The compiled step and `forward` (`forward_program`'s) run alternately, `repeats` timed times
    each after one of each untimed, so a slow spell of a shared machine hits both (apart, the
    forward's median moved by 10-20 % between runs of the same program): (state, step s,
    forward s: medians)."""
    import jax
    fwd, feats = forward
    steps, forwards = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        t1 = time.perf_counter()
        fwd(state["trainable"], frozen, feats).block_until_ready()
        if i:
            steps.append(t1 - t0)
            forwards.append(time.perf_counter() - t1)
    return state, statistics.median(steps), statistics.median(forwards)


# --- OpenFold's side -----------------------------------------------------------------------------
def run_openfold(job: dict, folder: Path) -> dict:
    import functools

    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint
    from openfold.model.model import AlphaFold as OFAlphaFold

    from molfun_jax.training import release_host_memory
    from tests.test_model import openfold_config, to_openfold_batch

    torch.utils.checkpoint.checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    cfg = bench_config(job["preset"], job["remat"], blocks=job.get("blocks"))
    oc = openfold_config(cfg)
    oc.model.evoformer_stack.blocks_per_ckpt = 1 if job["remat"] else None
    oc.model.extra_msa.extra_msa_stack.ckpt = job["remat"]
    oc.model.template.template_pair_stack.blocks_per_ckpt = 1 if job["remat"] else None
    model = OFAlphaFold(oc)
    model.load_state_dict(torch.load(folder / "openfold.pt"))
    model.eval()  # dropout off, as ours; gradients stay enabled
    for p in model.parameters():
        p.requires_grad_(False)
    variables = load_variables(folder, True)
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    trainable: list[torch.nn.Parameter] = []
    if job["strategy"] == "lora":
        trainable += wrap_lora(model, variables["lora"], t)
    elif job["strategy"].startswith("partial"):
        for blk in model.evoformer.blocks[-PARTIAL_N:]:
            trainable += list(blk.parameters())
        trainable += list(model.evoformer.linear.parameters())
    else:  # full: everything the affinity loss reaches (not the aux heads / structure module)
        trainable += [p for n, p in model.named_parameters()
                      if not n.startswith(("aux_heads.", "structure_module."))]
    for p in trainable:
        p.requires_grad_(True)
    head = {k: torch.nn.Parameter(t(v)) for k, v in
            {"ln_w": variables["head"]["layer_norm"]["scale"], "ln_b": variables["head"]["layer_norm"]["bias"],
             "w1": variables["head"]["linear_1"]["kernel"], "b1": variables["head"]["linear_1"]["bias"],
             "w2": variables["head"]["linear_2"]["kernel"], "b2": variables["head"]["linear_2"]["bias"]}.items()}
    trainable += list(head.values())
    del variables
    feats = chain_features(job["chain"], job["n"])
    batch = to_openfold_batch(feats, 1)
    seq_mask = torch.from_numpy(feats["seq_mask"]).float()
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)

    def step() -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        s = model(batch)["single"]  # [N, C_s]
        s = F.layer_norm(s, (s.shape[-1],), head["ln_w"], head["ln_b"], eps=1e-5)
        pooled = (s * seq_mask[:, None]).sum(0) / seq_mask.sum().clamp(min=1.0)
        pred = (torch.relu(pooled @ head["w1"] + head["b1"]) @ head["w2"] + head["b2"])[0]
        loss = (pred - TARGET) ** 2
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss), float(gn)

    times, out = [], {}
    release_host_memory()  # the same on both sides: free heap left by loading the weights
    setup_gib = reset_peak_rss()
    for i in range(job["repeats"] + 1):
        t0 = time.perf_counter()
        loss, gn = step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            out.update(loss=loss, grad_norm=gn)
    out.update(step_s=statistics.median(times[1:]), **peak_rss(setup_gib))
    return out


def wrap_lora(model, lora: dict, t) -> list:
    """Replace each adapted Linear of every Evoformer block by base + scale * (x @ a) @ b."""
    import torch
    from flax import traverse_util

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
            super().__init__()
            self.base, self.scale = base, scale
            self.a, self.b = torch.nn.Parameter(a), torch.nn.Parameter(b)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.scale * ((x @ self.a) @ self.b)

    params = []
    flat = traverse_util.flatten_dict(lora["evoformer"]["blocks"])
    for path in {p[:-1] for p in flat}:
        a, b, scale = flat[path + ("a",)], flat[path + ("b",)], flat[path + ("scale",)]
        for i, blk in enumerate(model.evoformer.blocks):
            parent = functools_reduce(getattr, path[:-1], blk)
            wrapped = LoRALinear(getattr(parent, path[-1]), t(a[i]), t(b[i]), float(scale[i]))
            setattr(parent, path[-1], wrapped)
            params += [wrapped.a, wrapped.b]
    return params


def functools_reduce(fn, seq, init):
    import functools
    return functools.reduce(fn, seq, init)


# --- driver --------------------------------------------------------------------------------------
def worker(side: str, job: dict, folder: Path) -> dict:
    """Run one job in a fresh process; its result dict (or {'error': ...})."""
    cmd = [sys.executable, __file__, "--worker", side, "--job", json.dumps(job), "--folder", str(folder)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": [error_line(p.stderr or p.stdout)]}


def error_line(output: str) -> str:
    """The line of a failed worker's output that says what went wrong: its last line, skipping
    the note JAX appends to a filtered traceback and the separators around it."""
    lines = [l.strip() for l in output.splitlines()
             if l.strip() and not l.startswith(_JAX_NOTE) and set(l.strip()) != {"-"}]
    return lines[-1][:300] if lines else "no output"


_JAX_NOTE = "For simplicity, JAX has removed its internal frames"


MEDIAN_KEYS = ("compile_s", "step_s", "rss_gib", "steps_rss_gib", "forward_s", "paired_step_s", "faults")


def run_rounds(job: dict, folder: Path, sides: Sequence[str], rounds: int) -> tuple[dict, dict, list[float]]:
    """Each side's job run `rounds` times, alternating (ours, OpenFold, ours, ...), each in a fresh
    process: per side the first good result with its times and peaks replaced by their medians
    over the rounds, and each round's speed ratio (OpenFold step / ours). A round's two runs
    follow each other, so a slow spell of a shared machine (the same step measured 7.5-9.4 s)
    tends to hit both."""
    runs: dict[str, list[dict]] = {side: [] for side in ("ours", "openfold")}
    for _ in range(rounds):
        for side in runs:
            if side in sides:
                runs[side].append(worker(side, job, folder))

    def merged(results: list[dict]) -> dict:
        good = [x for x in results if "error" not in x]
        if not good:
            return results[0] if results else {}
        return dict(good[0], **{k: statistics.median(x[k] for x in good) for k in MEDIAN_KEYS if k in good[0]})

    speeds = [r["step_s"] / o["step_s"] for o, r in zip(runs["ours"], runs["openfold"])
              if "step_s" in o and "step_s" in r]
    return merged(runs["ours"]), merged(runs["openfold"]), speeds


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="model_1_ptm")
    ap.add_argument("--chain", default="2gu3A")
    ap.add_argument("--strategies", default="lora,partial,full",
                    help="lora, partial, partial_unsplit (ours through every block), full")
    ap.add_argument("--n", default="64", help="comma-separated crop sizes")
    ap.add_argument("--remat", default="on,off", help="'on', 'off' or both")
    ap.add_argument("--policy", default=None, help="globals.remat_policy override (ours)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="ours: globals.chunk_size (attention / outer product mean chunking, for memory)")
    ap.add_argument("--blocks", type=int, default=None, help="Evoformer blocks on both sides (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sides", default="ours,openfold")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each row's two sides this many times, alternating; report medians and each round's speed")
    ap.add_argument("--forward", action="store_true",
                    help="ours: also time the forward (LoRA rows); print both matmul FLOP counts and rates")
    ap.add_argument("--compile-only", action="store_true",
                    help="ours only: XLA memory plans (fp32 and bf16) of the LoRA step, remat on")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="ours: trace one more step into DIR and print the top ops by time (with --forward: "
                         "each module's step time against the forward program's)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="ours: XLA's persistent compilation cache in DIR, which the CLI uses by default, so each "
                         "row measures a rerun (the step loaded, not compiled); one untimed run a row fills DIR first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inputs", default=None, metavar="DIR",
                    help="keep the written inputs in DIR and reuse them when present (same preset/seed/blocks)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        job, folder = json.loads(args.job), Path(args.folder)
        res = run_ours(job, folder) if args.worker == "ours" else run_openfold(job, folder)
        print("RESULT " + json.dumps(res), flush=True)
        return

    ns = [int(x) for x in args.n.split(",")]
    remats = [r == "on" for r in args.remat.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.inputs or tmp)
        t0 = time.perf_counter()
        if not (folder / "variables.npz").exists():
            folder.mkdir(parents=True, exist_ok=True)
            write_inputs(args.preset, args.seed, folder, args.blocks)
        else:  # reused: written for this preset, seed and block count?
            check_inputs(folder, args.preset, args.seed, args.blocks)
        print(f"inputs ready in {time.perf_counter() - t0:.0f} s ({folder}); preset {args.preset}, chain {args.chain}, "
              f"{args.blocks or 'all'} Evoformer blocks, 0 recycles, LoRA r{RANK} {'/'.join(LORA_TARGETS)}, "
              f"chunk size {args.chunk_size} (ours); machine load "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
              + (f"; XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""), flush=True)
        base = {"preset": args.preset, "chain": args.chain, "repeats": args.repeats, "policy": args.policy,
                "blocks": args.blocks, "chunk_size": args.chunk_size, "profile": args.profile,
                "compile_cache": args.compile_cache and str(Path(args.compile_cache).absolute())}
        if args.compile_only:
            print(f"{'N':>5} {'dtype':>9} {'compile s':>10} {'XLA temp GiB':>13} {'XLA total GiB':>14}")
            for n in ns:
                for dtype in ("float32", "bfloat16"):
                    r = worker("ours", dict(base, strategy="lora", n=n, remat=True, dtype=dtype,
                                            compile_only=True), folder)
                    print(f"{n:>5} {dtype:>9} {fmt(r.get('compile_s'), '10.1f')} "
                          f"{fmt(r.get('xla_temp_gib'), '13.2f')} {fmt(r.get('xla_total_gib'), '14.2f')}"
                          + (f"  {r['error']}" if "error" in r else ""), flush=True)
            return
        print(f"{'strategy':>15} {'N':>4} {'remat':>5} | {'compile':>7} {'step s':>7} {'RSS GiB':>7} {'steps':>6} "
              f"{'XLA GiB':>7} {'fwd s':>6} | {'OF step':>7} {'OF RSS':>6} {'steps':>6} | {'speed':>6} {'mem':>6} "
              f"{'steps':>6} | {'loss rel':>8} {'|g| rel':>8}")
        for strat in args.strategies.split(","):
            for n in ns:
                for remat in remats:
                    job = dict(base, strategy=strat, n=n, remat=remat, dtype="float32",
                               forward=args.forward and strat == "lora")
                    if args.compile_cache and "ours" in args.sides.split(","):
                        fill = worker("ours", dict(job, repeats=1, forward=False, profile=None), folder)
                        print(f"    compile cache {args.compile_cache}: filled (compile {fmt(fill.get('compile_s'), '.1f')}"
                              f" s){'  ' + str(fill['error']) if 'error' in fill else ''}", flush=True)
                    o, r, speeds = run_rounds(job, folder, args.sides.split(","), args.rounds)
                    ratio = lambda a: (r[a] / o[a]) if a in r and a in o else None
                    rel = lambda a: abs(o[a] - r[a]) / max(abs(r[a]), 1e-30) if a in r and a in o else None
                    print(f"{strat:>15} {n:>4} {'on' if remat else 'off':>5} | {fmt(o.get('compile_s'), '7.1f')} "
                          f"{fmt(o.get('step_s'), '7.2f')} {fmt(o.get('rss_gib'), '7.2f')} "
                          f"{fmt(o.get('steps_rss_gib'), '6.2f')} "
                          f"{fmt(o.get('xla_total_gib'), '7.2f')} {fmt(o.get('forward_s'), '6.2f')} | "
                          f"{fmt(r.get('step_s'), '7.2f')} {fmt(r.get('rss_gib'), '6.2f')} "
                          f"{fmt(r.get('steps_rss_gib'), '6.2f')} | "
                          f"{fmt(ratio('step_s'), '6.2f')} {fmt(ratio('rss_gib'), '6.2f')} "
                          f"{fmt(ratio('steps_rss_gib'), '6.2f')} | "
                          f"{fmt(rel('loss'), '8.1e')} {fmt(rel('grad_norm'), '8.1e')}", flush=True)
                    if len(speeds) > 1:
                        print(f"    speed by round: {' '.join(f'{x:.2f}' for x in speeds)} "
                              f"(median {statistics.median(speeds):.2f}); times and peaks above: medians of "
                              f"{args.rounds} runs a side")
                    for side, d in (("ours", o), ("openfold", r)):
                        if "error" in d:
                            print(f"    {side} failed: {d['error']}")
                        elif d:
                            faults = f", {d['faults']:,.0f} page faults a step" if "faults" in d else ""
                            print(f"    {side}: loss {d.get('loss'):.6e} grad_norm {d.get('grad_norm'):.6e}{faults}")
                    if "forward_flops" in o:  # the step/forward ratio's floor if both ran at one FLOP rate
                        step_s = o["paired_step_s"]  # timed alternately with the forward
                        step_rate, fwd_rate = o["flops"] / step_s, o["forward_flops"] / o["forward_s"]
                        print(f"    ours: step {o['flops'] / 1e9:.1f} GFLOP in matmuls = "
                              f"{o['flops'] / o['forward_flops']:.2f}x the forward's {o['forward_flops'] / 1e9:.1f}; "
                              f"step/forward {step_s / o['forward_s']:.2f}x ({step_s:.2f} s / {o['forward_s']:.2f} s, "
                              f"timed alternately): the step runs at "
                              f"{step_rate / 1e9:.1f} GFLOP/s, {100 * step_rate / fwd_rate:.0f}% of the forward's "
                              f"{fwd_rate / 1e9:.1f}")
                    for what, t_ms, share in o.get("top_ops", []):
                        print(f"    {t_ms:10.1f} ms {100 * share:5.1f}%  {what}")
        print("speed = OpenFold step / ours; mem = OpenFold peak RSS / ours (whole process; steps: peak RSS while "
              "stepping, weights loaded and step compiled); rel = |ours - OpenFold| / |OpenFold|")


if __name__ == "__main__":
    main()

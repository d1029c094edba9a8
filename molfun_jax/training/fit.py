"""Batching, evaluation, the head-only trunk cache and the fit loop.

Examples are dicts of numpy arrays (OpenFold feature names, one example, no batch axis) with a
scalar `target`; examples of equal feature shapes (a length bucket) are batched together. An
accumulation group stacks `k` micro-batches of `B` examples: leaves `[k, B, ...]`, with
`weight` 1 for real examples and 0 for the padding that fills an epoch's last micro-batch of a
bucket and its last group. One group = one optimizer step, so an epoch has
sum over buckets of ceil(ceil(n_bucket / B) / k) steps (`schedules.steps_per_epoch`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import Mesh

from molfun_jax.data.buckets import collate, pad_features
from molfun_jax.feature_schema import FEATURE_SCHEMA, N_ATOM
from molfun_jax.heads.affinity import HeadConfig, TargetNorm, affinity_loss
from molfun_jax.reports import StepProgress, regression_metrics
from molfun_jax.training.distributed import data_mesh, replicate, shard_batch, to_host
from molfun_jax.training.guard import MAX_SKIPPED_STEPS, SkipCounter
from molfun_jax.training.memory import release_host_memory, reusing_host_buffers
from molfun_jax.training.schedules import steps_per_epoch
from molfun_jax.training.step import (CACHED_KEY, HEAD_INPUT_KEYS, AffinityModel, eval_params, init_state,
                                      make_predict_step, make_single_step, make_train_step, with_dtype)
from molfun_jax.training.strategies import Plan, Strategy

Example = Mapping[str, Any]


def _numeric(ex: Example) -> dict[str, np.ndarray]:
    out = {}
    for k, v in ex.items():
        a = np.asarray(v)
        if a.dtype.kind in "biuf":
            out[k] = a
    if "target" not in out:
        raise ValueError(f"example without a numeric 'target' (keys: {sorted(ex)})")
    return out


# the dims that do not split batches where the trunk runs (train, trunk cache, predict): the
# ligand's atom bucket, since the head's cost at the largest one is small beside the trunk's; on
# cached trunk outputs the head alone runs and its atom buckets stay apart
TRUNK_MERGED_DIMS = (N_ATOM,)


def _merged_axes(key: str, merged_dims: Sequence[str]) -> tuple[int, ...]:
    """The axes of feature `key` along the schema dims `merged_dims` (none for a label)."""
    spec = FEATURE_SCHEMA.features.get(key)
    return tuple(a for a, d in enumerate(spec.shape) if d in merged_dims) if spec is not None else ()


def _signature(ex: Mapping[str, np.ndarray], merged_dims: Sequence[str] = ()) -> tuple:
    """An example's bucket: its keys, dtypes and shapes, less the axes of `merged_dims`."""
    def shape(k: str, v: np.ndarray) -> tuple:
        axes = _merged_axes(k, merged_dims)
        return tuple(n for a, n in enumerate(v.shape) if a not in axes)
    return tuple(sorted((k, shape(k, v), v.dtype.str) for k, v in ex.items() if k != "target"))


def _dim_sizes(ex: Mapping[str, np.ndarray], dims: Sequence[str]) -> dict[str, int]:
    """The sizes of the schema dims `dims` in `ex` (a dim that none of its features has left out)."""
    return {d: v.shape[a] for k, v in ex.items() for d in dims for a in _merged_axes(k, (d,))}


def _padded(ex: dict[str, np.ndarray], sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """`ex` with its features zero-padded to `sizes` along those schema dims."""
    names = [k for k in ex if _merged_axes(k, tuple(sizes))]
    return {**ex, **pad_features({k: ex[k] for k in names}, None, sizes=sizes)} if names else ex


def make_batches(examples: Sequence[Example], batch_size: int, accumulation_steps: int = 1,
                 rng: Optional[np.random.Generator] = None,
                 merged_dims: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:
    """Accumulation groups (leaves `[k, B, ...]`, plus `weight` `[k, B]`). With `rng`, examples
    are shuffled within their bucket and groups shuffled across buckets. The sizes of the schema
    dims `merged_dims` do not split buckets: a bucket's examples are zero-padded along them to
    the bucket's largest, as they are batched (e.g. `N_atom`, the ligand atom buckets, when the
    trunk runs: one compile a length bucket, not one a length and atom bucket)."""
    if batch_size < 1 or accumulation_steps < 1:
        raise ValueError(f"batch_size and accumulation_steps must be >= 1, got {batch_size}, {accumulation_steps}")
    exs = [_numeric(e) for e in examples]
    buckets: dict[tuple, list[int]] = {}
    for i, e in enumerate(exs):
        buckets.setdefault(_signature(e, merged_dims), []).append(i)
    groups = []
    for idx in buckets.values():
        sizes: dict[str, int] = {}
        for i in idx:
            for d, n in _dim_sizes(exs[i], merged_dims).items():
                sizes[d] = max(sizes.get(d, 0), n)
        idx = list(rng.permutation(idx)) if rng is not None else idx
        micro = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        for g in range(0, len(micro), accumulation_steps):
            mbs = micro[g:g + accumulation_steps]
            ids = np.full((accumulation_steps, batch_size), mbs[0][0])
            weight = np.zeros((accumulation_steps, batch_size), np.float32)
            for j, mb in enumerate(mbs):
                ids[j, :len(mb)], weight[j, :len(mb)] = mb, 1.0
            batch = {k: v.reshape(ids.shape + v.shape[1:])
                     for k, v in collate([_padded(exs[i], sizes) for i in ids.ravel()]).items()}
            batch["target"] = batch["target"].astype(np.float32)
            batch["weight"] = weight
            groups.append(batch)
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups


def count_steps(examples: Sequence[Example], batch_size: int, accumulation_steps: int,
                merged_dims: Sequence[str] = ()) -> int:
    """Optimizer steps per epoch (= len(make_batches(...)))."""
    sizes: dict[tuple, int] = {}
    for e in examples:
        s = _signature(_numeric(e), merged_dims)
        sizes[s] = sizes.get(s, 0) + 1
    return steps_per_epoch([math.ceil(n / batch_size) for n in sizes.values()], accumulation_steps)


def target_norm(examples: Sequence[Example], normalize: bool = True) -> TargetNorm:
    """The target normalisation of a train split: its mean / std (`normalize`), else identity."""
    return TargetNorm.fit([float(np.asarray(e["target"])) for e in examples]) if normalize else TargetNorm()


def _normalized(model: AffinityModel, examples: Sequence[Example], norm: TargetNorm) -> list[dict]:
    """`examples` as `model` reads them (`AffinityModel.inputs`), targets normalised."""
    return [{**model.inputs(e), "target": np.float32(norm.normalize(float(np.asarray(e["target"]))))}
            for e in examples]


def predict_all(predict_step: Callable, trainable: Any, frozen: Any, examples: Sequence[Example],
                batch_size: int, mesh: Mesh, merged_dims: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) of `examples`, in their order (normalised units as given);
    `merged_dims` as `make_batches`."""
    exs = [{**e, "_index": np.int32(i)} for i, e in enumerate(examples)]
    preds, targets = np.zeros(len(exs)), np.zeros(len(exs))
    for b in make_batches(exs, batch_size, merged_dims=merged_dims):
        b = {k: v[0] for k, v in b.items()}
        idx, w = b.pop("_index"), b["weight"] > 0
        p = to_host(predict_step(trainable, frozen, shard_batch(b, mesh, 0)))
        preds[idx[w]], targets[idx[w]] = p[w], b["target"][w]
    return preds, targets


def evaluate(predict_step: Callable, trainable: Any, frozen: Any, examples: Sequence[Example],
             batch_size: int, mesh: Mesh, norm: TargetNorm, head_config: HeadConfig,
             merged_dims: Sequence[str] = ()) -> dict[str, Any]:
    """Loss (mean per-example loss in normalised units, as in training) and RMSE / MAE /
    Pearson r / Spearman rho on the original target scale. `examples` carry normalised targets."""
    p, t = predict_all(predict_step, trainable, frozen, examples, batch_size, mesh, merged_dims)
    loss = float(np.mean(np.asarray(affinity_loss(jnp.asarray(p), jnp.asarray(t), head_config.loss,
                                                  head_config.huber_delta))))
    pred, true = norm.denormalize(p), norm.denormalize(t)
    return {"loss": loss, **regression_metrics(true, pred), "predictions": pred, "targets": true}


def cache_trunk(model: AffinityModel, variables: Mapping[str, Any], examples: Sequence[Example],
                batch_size: int, mesh: Mesh) -> list[dict]:
    """Head-only fast path: each example's trunk output computed once (deterministic) and kept
    with what the head needs (`single`, `seq_mask`, `pocket_mask`, the ligand head's pose and
    graph when present: `HEAD_INPUT_KEYS`; `target`). Memory: `cache_entry_bytes`."""
    single_step = make_single_step(model, mesh)
    variables = replicate(variables, mesh)
    exs = [{**e, "_index": np.int32(i)} for i, e in enumerate(examples)]
    out: list[Optional[dict]] = [None] * len(exs)
    for b in make_batches(exs, batch_size, merged_dims=TRUNK_MERGED_DIMS):
        b = {k: v[0] for k, v in b.items()}
        idx, w = b.pop("_index"), b["weight"]
        s = to_host(single_step(variables, shard_batch(b, mesh, 0)))
        for j in np.flatnonzero(w > 0):
            i = int(idx[j])
            out[i] = {CACHED_KEY: s[j], "target": examples[i]["target"],
                      **{k: np.asarray(examples[i][k]) for k in HEAD_INPUT_KEYS[1:] if k in examples[i]}}
    return out  # type: ignore[return-value]


def cache_entry_bytes(example: Example, c_s: int) -> int:
    """Bytes one entry takes in the head-only cache: its trunk output `single` [N_res, c_s]
    float32, the head inputs it keeps (`HEAD_INPUT_KEYS`; the ligand head's pose and graph) and
    its target. No pair representation is cached."""
    n_res = np.shape(example["seq_mask"])[-1]
    kept = sum(np.asarray(example[k]).nbytes for k in HEAD_INPUT_KEYS[1:] if k in example)
    return n_res * c_s * 4 + kept + 4


@dataclasses.dataclass
class FitResult:
    """What `fit` returns. `variables` are the best epoch's (EMA ones when EMA is on) combined
    with the frozen params; `state` the train state after the last epoch."""
    history: list[dict[str, Any]]
    variables: dict
    state: dict
    frozen: dict
    plan: Plan
    norm: TargetNorm
    best_epoch: int
    model: AffinityModel


def fit(model_config: mlc.ConfigDict, strategy: Strategy, variables: Mapping[str, Any],
        train: Sequence[Example], val: Optional[Sequence[Example]] = None, *,
        head_config: HeadConfig = HeadConfig(), epochs: int = 10, batch_size: int = 8, seed: int = 0,
        normalize_targets: bool = True, norm: Optional[TargetNorm] = None, cache: Optional[bool] = None,
        trunk_dropout: bool = False, mesh: Optional[Mesh] = None, progress: Optional[bool] = None,
        log: Optional[Callable[[str], None]] = None,
        on_epoch_end: Optional[Callable[[int, dict, dict, bool], None]] = None,
        on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
        state: Optional[dict] = None, history: Optional[list[dict]] = None,
        max_skipped_steps: int = MAX_SKIPPED_STEPS) -> FitResult:
    """Fine-tune `variables` ({'trunk', 'head', 'lora'}, e.g. `AffinityModel.init_variables`)
    on `train` with `strategy`; validate on `val` each epoch (with the EMA params when EMA is on).

    The model runs in bfloat16 when `strategy.amp`. Targets are normalised with the train split's
    mean / std (`normalize_targets`; or a given `norm`). `cache` (default: whenever only the head
    trains and the trunk runs deterministically) computes the trunk outputs once and trains the
    head on them. Early stopping watches the val loss (the train loss without `val`) with
    `strategy.early_stopping_patience` (0 = off). `on_epoch_end(epoch, row, state, is_best)` runs
    after each epoch (e.g. checkpointing; 1-based epoch), `on_step(step, {'loss', 'lr',
    'grad_norm'})` after each optimizer step (e.g. a tracker; `lr` of the primary label). To
    resume, pass the restored `state` and the `history` so far: training continues at epoch
    len(history) + 1. Batches hold only what the model reads (`AffinityModel.inputs`). The
    train step is compiled for each new batch shape before that shape's first step, and the heap
    the compiler freed goes back to the OS (`release_host_memory`) before the step runs; from the
    first compile to the end of training the steps' freed buffers stay mapped for the next step
    (`reusing_host_buffers`).

    A step whose loss or gradient norm is not finite is skipped (no update; counted in the row's
    `skipped_steps`); `max_skipped_steps` in a row stop the run with SkippedStepsError.
    """
    if not train:
        raise ValueError("no training examples")
    mesh = mesh or data_mesh()
    if batch_size % mesh.size:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the number of devices ({mesh.size})")
    model = AffinityModel(with_dtype(model_config, strategy.compute_dtype), head_config, trunk_dropout)
    plan = strategy.plan(variables, head_source=head_config.source)
    norm = norm if norm is not None else target_norm(train, normalize_targets)
    train_n, val_n = _normalized(model, train, norm), _normalized(model, val or [], norm)
    if cache is None:
        cache = set(plan.learning_rates) == {"head"} and not trunk_dropout
    merged = () if cache else TRUNK_MERGED_DIMS
    k = strategy.accumulation_steps
    total_steps = epochs * count_steps(train_n, batch_size, k, merged)
    tx = plan.optimizer(total_steps)
    if cache:
        train_n = cache_trunk(model, variables, train_n, batch_size, mesh)
        val_n = cache_trunk(model, variables, val_n, batch_size, mesh) if val_n else []
    if state is None:
        state, frozen = init_state(plan, variables, tx, jax.random.PRNGKey(seed), strategy.ema_decay)
    else:
        frozen = plan.split(variables)[1]
    state, frozen = replicate(state, mesh), replicate(frozen, mesh)
    train_step = make_train_step(model, plan, tx, mesh, strategy.ema_decay)
    predict_step = make_predict_step(model, plan, mesh)
    lr_fn = plan.schedule(plan.primary_label, total_steps)

    history = list(history or [])
    monitor = "val_loss" if val_n else "train_loss"
    past = [r[monitor] for r in history if r.get(monitor) is not None]
    best_loss = min(past) if past else math.inf
    best_epoch = history[int(np.argmin(past))]["epoch"] if past else 0
    best_trainable, waited = None, 0
    if history and best_epoch:
        waited = history[-1]["epoch"] - best_epoch
    patience = strategy.early_stopping_patience
    skips = SkipCounter(max_skipped_steps)
    compiled: dict[tuple, Callable] = {}  # the train step compiled for each batch shape
    with StepProgress(progress) as bar, contextlib.ExitStack() as host:
        for epoch in range(len(history) + 1, epochs + 1):
            if patience and waited >= patience:
                break
            t0 = time.time()
            groups = make_batches(train_n, batch_size, k, np.random.default_rng([seed, epoch]), merged)
            bar.start(f"epoch {epoch}/{epochs}", len(groups))
            loss_sum, weight_sum, skipped = 0.0, 0.0, 0
            for g in groups:
                batch, shapes = shard_batch(g, mesh, 1), tuple(v.shape for v in g.values())
                if shapes not in compiled:  # compiled before it runs, so the step never holds the compiler's heap
                    compiled[shapes] = train_step.lower(state, frozen, batch).compile()
                    release_host_memory()
                    if len(compiled) == 1:  # from here the steps' buffers stay mapped
                        host.enter_context(reusing_host_buffers())
                state, m = compiled[shapes](state, frozen, batch)
                bad = bool(m["skipped"])
                skipped += bad
                skips.update(bad, epoch, int(state["step"]))
                if not bad:
                    w = float(m["weight"])
                    loss_sum, weight_sum = loss_sum + float(m["loss"]) * w, weight_sum + w
                bar.advance(float(m["loss"]), skipped)
                if on_step is not None:
                    done = int(state["step"])
                    on_step(done, {"loss": float(m["loss"]), "lr": float(lr_fn(done - 1)),
                                   "grad_norm": float(m["grad_norm"])})
            step = int(state["step"])
            row: dict[str, Any] = {"epoch": epoch, "step": step,
                                   "train_loss": loss_sum / weight_sum if weight_sum else math.nan,
                                   "val_loss": None, "lr": float(lr_fn(step - 1)), "skipped_steps": skipped}
            if val_n:
                ev = evaluate(predict_step, eval_params(state), frozen, val_n, batch_size, mesh, norm, head_config,
                              merged)
                row.update(val_loss=ev["loss"], **{f"val_{m}": ev[m] for m in ("rmse", "mae", "pearson", "spearman")})
            row["epoch_time_s"] = time.time() - t0
            is_best = row[monitor] < best_loss
            if is_best:
                best_loss, best_epoch, waited = row[monitor], epoch, 0
                best_trainable = jax.tree_util.tree_map(jnp.copy, eval_params(state))
            else:
                waited += 1
            history.append(row)
            if log is not None:
                log(_epoch_line(row))
            if on_epoch_end is not None:
                on_epoch_end(epoch, row, state, is_best)
    if best_trainable is None:  # no epoch ran, or a resumed run never beat its earlier best
        best_trainable = eval_params(state)
    return FitResult(history, plan.combine(best_trainable, frozen), state, frozen, plan, norm, best_epoch, model)


def _epoch_line(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}", f"step {row['step']}", f"train_loss {row['train_loss']:.4f}"]
    for k in ("val_loss", "val_rmse", "val_pearson"):
        if row.get(k) is not None:
            parts.append(f"{k} {row[k]:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    if row.get("skipped_steps"):
        parts.append(f"skipped {row['skipped_steps']} non-finite steps")
    return "  ".join(parts)

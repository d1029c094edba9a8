"""The model as pure functions, the train state, and the one jitted train step
(docs/architecture.md).

Train state (a plain pytree): `{'step', 'trainable', 'opt_state', 'rng'[, 'ema']}`; the frozen
subtree (`Plan.split`) is a separate, non-differentiated argument of the step, so the gradient is
taken w.r.t. the trainable subtree only (head-only never back-propagates through the trunk).

A step consumes one accumulation group: every batch leaf is `[k, B, ...]` (k micro-batches of B
examples) with per-example `weight` (1 real, 0 padding) and normalised `target`. The gradient is
sum_i w_i grad(loss_i) / sum_i w_i over all k*B examples (and all devices), so k micro-batches
give the update of one batch of their union; a micro-batch whose weights are all 0 (the padding
of an epoch's last, partial group) is skipped with `lax.cond`. Then global-norm clipping and the
plan's optimizer, and the EMA `ema <- d * ema + (1 - d) * params` of the trainable params.

Data parallel: the step runs under `jax.shard_map` over the mesh axis 'data' (batch axis 1 split
over devices, state replicated) with `lax.psum` of gradient, loss and weight sums. The dropout
key of an example is `fold_in(fold_in(rng, step), i * B + b)` for micro-batch i and global
position b, i.e. its position in the group: the update depends neither on the number of devices
nor on how the group is cut into micro-batches.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from jax.sharding import Mesh, PartitionSpec as P

from molfun_jax.config import resolve_remat_policy
from molfun_jax.feature_schema import FEATURE_SCHEMA
from molfun_jax.heads.affinity import HeadConfig, affinity_loss
from molfun_jax.heads.registry import ALL_HEAD_INPUT_KEYS, dummy_head_inputs, head_inputs, head_kind, make_head
from molfun_jax.lora import init_lora
from molfun_jax.model import AlphaFold
from molfun_jax.training.distributed import DATA_AXIS
from molfun_jax.training.guard import keep_if_finite
from molfun_jax.training.strategies import BLOCKS, EMBEDDERS, Plan, Strategy

Array = jax.Array
# batch keys that are not model inputs
LABEL_KEYS = ("target", "weight")
# an example holding this key is a cached trunk output (head-only fast path): the trunk is skipped
CACHED_KEY = "single"
# what the head-only cache keeps of an example: the trunk output and every head's inputs
HEAD_INPUT_KEYS = ("single", "seq_mask", "pocket_mask") + ALL_HEAD_INPUT_KEYS


def with_dtype(config: mlc.ConfigDict, dtype: str) -> mlc.ConfigDict:
    """A copy of a model config with compute dtype `dtype` ('float32' | 'bfloat16')."""
    c = copy.deepcopy(config)
    c.globals.dtype = dtype
    return c


@dataclasses.dataclass(frozen=True, eq=False)
class AffinityModel:
    """AlphaFold trunk + affinity head as pure functions of `variables = {'trunk', 'head', 'lora'}`
    on ONE example (vmap for batches).

    `trunk_dropout`: run the trunk's own dropout (OpenFold's rates) while training; off by
    default (the trunk is run deterministically; the head's dropout and the LoRA dropout still
    apply when an RNG is given).
    `frozen_blocks`: the first k Evoformer blocks run forward-only (`AlphaFold(frozen_blocks=k)`);
    None: `make_train_step` takes k from the plan (Partial: the blocks below the trained ones).
    """
    config: mlc.ConfigDict
    head_config: Any = HeadConfig()  # any registered head's config (`molfun_jax.heads.registry`)
    trunk_dropout: bool = False
    frozen_blocks: Optional[int] = None

    @property
    def head(self) -> Any:
        return make_head(self.head_config)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The example keys the model reads: the trunk's features, a cached trunk output, and
        the head's own inputs."""
        return tuple(dict.fromkeys(FEATURE_SCHEMA.model_inputs + HEAD_INPUT_KEYS[:3]
                                   + head_kind(self.head_config).input_keys))

    def inputs(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """`example` without the keys the model does not read (labels kept). A batch then holds
        nothing else: a feature the model ignores (the ligand's atom count under the pocket
        head) neither splits a length bucket nor compiles the step once more."""
        keep = set(self.input_keys + LABEL_KEYS)
        return {k: v for k, v in example.items() if k in keep}

    def init_variables(self, trunk_params: Mapping[str, Any], strategy: Strategy, rng: Array) -> dict:
        """Variables around pretrained trunk params: a fresh head and, for LoRA, fresh adapters.
        Both are made by one jitted program: run eagerly, every primitive of the head's init
        compiles on its own and JAX keeps it (the ligand head's init held 0.26 GiB, 5 s)."""
        c_s = self.config.model.evoformer_stack.c_s
        lcfg = strategy.lora_config()
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trunk_params)

        def init(key: Array) -> tuple[Any, Any]:
            k_head, k_lora = jax.random.split(key)
            head = self.head.init(k_head, jnp.zeros((1, c_s), jnp.float32), jnp.ones((1,), jnp.float32),
                                  **dummy_head_inputs(self.head_config))["params"]
            return head, init_lora(shapes, lcfg, k_lora) if lcfg is not None else {}

        head, lora = jax.jit(init)(rng)
        return {"trunk": trunk_params, "head": head, "lora": lora}

    def single(self, variables: Mapping[str, Any], ex: Mapping[str, Array], rng: Optional[Array] = None) -> Array:
        """The single representation the head reads, [N_res, C_s]."""
        coll = {"params": variables["trunk"]}
        if variables.get("lora"):
            coll["lora"] = variables["lora"]
        deterministic = rng is None or not self.trunk_dropout
        config = resolve_remat_policy(self.config, ex["aatype"].shape[-1], jax.default_backend())
        out = AlphaFold(config).apply(coll, ex, deterministic=deterministic, frozen_blocks=self.frozen_blocks or 0,
                                           rngs={"dropout": rng} if rng is not None else None)
        return out["single"] if self.head_config.source == "evoformer" else out["sm"]["single"]

    def predict(self, variables: Mapping[str, Any], ex: Mapping[str, Array], rng: Optional[Array] = None) -> Array:
        """Predicted (normalised) affinity of one example; training mode when `rng` is given.
        An example with a cached `single` skips the trunk."""
        k_trunk, k_head = jax.random.split(rng) if rng is not None else (None, None)
        single = ex[CACHED_KEY] if CACHED_KEY in ex else self.single(variables, ex, k_trunk)
        return self.head.apply({"params": variables["head"]}, single, ex["seq_mask"], ex.get("pocket_mask"),
                               **head_inputs(self.head_config, ex), deterministic=rng is None,
                               rngs={"dropout": k_head} if rng is not None else None)


def init_state(plan: Plan, variables: Mapping[str, Any], tx: optax.GradientTransformation, rng: Array,
               ema_decay: float = 0.0) -> tuple[dict, dict]:
    """(train state, frozen subtree) at step 0. The state owns copies of the trainable arrays
    (the step donates its state, which must not free arrays of `variables`)."""
    trainable, frozen = plan.split(variables)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable), "rng": rng}
    if ema_decay:
        state["ema"] = jax.tree_util.tree_map(jnp.copy, trainable)
    return state, frozen


def eval_params(state: Mapping[str, Any]) -> Any:
    """The trainable params used for evaluation: the EMA ones when EMA is on."""
    return state["ema"] if "ema" in state else state["trainable"]


def frozen_blocks(plan: Plan) -> int:
    """How many leading Evoformer blocks need no backward under `plan`: the first trained block
    of the stack (Partial), 0 when any trained leaf sits in or below the first block (LoRA,
    Full), `no_blocks` when nothing in or below the stack trains (head-only)."""
    starts = [r.start for p, r in plan.rules.items() if p[1:3] == BLOCKS[1:]]
    below = any(p[0] in ("trunk", "lora") and p[1] in EMBEDDERS for p in plan.rules)
    return 0 if below else min(starts, default=plan.no_blocks)


def _jit_over(mesh: Mesh, fn: Callable, in_specs: Any, out_specs: Any, **jit_kwargs: Any) -> Callable:
    """`fn` under `shard_map` over `mesh`, jitted."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False),
                   **jit_kwargs)


def _features(batch: Mapping[str, Array]) -> dict[str, Array]:
    return {k: v for k, v in batch.items() if k not in LABEL_KEYS}


def make_train_step(model: AffinityModel, plan: Plan, tx: optax.GradientTransformation, mesh: Mesh,
                    ema_decay: float = 0.0) -> Callable[[dict, dict, dict], tuple[dict, dict]]:
    """`step(state, frozen, batch) -> (state, metrics)`, jitted (state donated). `batch` leaves
    are `[k, B, ...]` global arrays sharded on axis 1 (`distributed.shard_batch(batch, mesh, 1)`);
    metrics: weighted mean `loss`, `weight` (real examples), `grad_norm` (before clipping) and
    `skipped` (1 when the loss or grad_norm was not finite and the update was dropped)."""
    hc = model.head_config
    if model.frozen_blocks is None:
        model = dataclasses.replace(model, frozen_blocks=frozen_blocks(plan))

    def local_step(state: dict, frozen: dict, batch: dict) -> tuple[dict, dict]:
        k, n_local = batch["weight"].shape[:2]
        step_key = jax.random.fold_in(state["rng"], state["step"])
        first = jax.lax.axis_index(DATA_AXIS) * n_local  # global position of this device's first example
        n_global = n_local * mesh.shape[DATA_AXIS]

        def loss_sum(trainable: Any, mb: dict, i: Array) -> Array:
            variables = plan.combine(trainable, frozen)
            keys = jax.vmap(lambda j: jax.random.fold_in(step_key, i * n_global + first + j))(jnp.arange(n_local))
            preds = jax.vmap(model.predict, in_axes=(None, 0, 0))(variables, _features(mb), keys)
            return jnp.sum(affinity_loss(preds, mb["target"], hc.loss, hc.huber_delta) * mb["weight"])

        grad_fn = jax.value_and_grad(loss_sum)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["trainable"])

        def micro(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            g_acc, l_acc = carry
            mb, i = xs
            l, g = jax.lax.cond(jnp.sum(mb["weight"]) > 0,
                                lambda: grad_fn(state["trainable"], mb, i),
                                lambda: (jnp.zeros((), jnp.float32), zeros))
            return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l), None

        (g, l), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(k)))
        g, l, w = jax.lax.psum((g, l, jnp.sum(batch["weight"])), DATA_AXIS)
        denom = jnp.maximum(w, 1.0)
        grads = jax.tree_util.tree_map(lambda x: x / denom, g)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {"trainable": trainable, "opt_state": opt_state}
        if "ema" in state:
            new["ema"] = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                                state["ema"], trainable)
        grad_norm = optax.global_norm(grads)
        # a non-finite loss / gradient leaves params, optimizer state and EMA as they were
        new, skipped = keep_if_finite(new, {k: state[k] for k in new}, l, grad_norm)
        new.update(step=state["step"] + 1, rng=state["rng"])
        return new, {"loss": l / denom, "weight": w, "grad_norm": grad_norm, "skipped": skipped}

    return _jit_over(mesh, local_step, (P(), P(), P(None, DATA_AXIS)), (P(), P()), donate_argnums=(0,))


def make_predict_step(model: AffinityModel, plan: Plan, mesh: Mesh) -> Callable[[Any, dict, dict], Array]:
    """`predict(trainable, frozen, batch) -> [B]` normalised predictions (deterministic), jitted;
    batch leaves `[B, ...]` sharded on axis 0."""
    def local(trainable: Any, frozen: dict, batch: dict) -> Array:
        variables = plan.combine(trainable, frozen)
        return jax.vmap(model.predict, in_axes=(None, 0))(variables, _features(batch))

    return _jit_over(mesh, local, (P(), P(), P(DATA_AXIS)), P(DATA_AXIS))


def make_single_step(model: AffinityModel, mesh: Mesh) -> Callable[[dict, dict], Array]:
    """`single(variables, batch) -> [B, N_res, C_s]` trunk outputs (deterministic), jitted: the
    head-only cache."""
    def local(variables: dict, batch: dict) -> Array:
        return jax.vmap(model.single, in_axes=(None, 0))(variables, _features(batch)).astype(jnp.float32)

    return _jit_over(mesh, local, (P(), P(DATA_AXIS)), P(DATA_AXIS))

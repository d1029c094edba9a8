"""Non-finite guard (molfun_jax.training.guard): a step with a NaN feature or an infinite loss is
skipped and counted, leaving params, optimizer state and EMA bit-identical; K such steps in a row
stop `fit` naming the epoch and step; the API refuses NaN / inf examples, naming them."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from molfun_jax.heads import HeadConfig
from molfun_jax.training import (AffinityModel, HeadOnly, LoRA, NonFiniteInputError, SkippedStepsError,
                                 check_finite_examples, fit, make_batches, shard_batch)
from tests.finetune_common import random_trunk, tiny_config
from tests.product_data import chain_examples, compile_cache, data_csv, fast_weights  # noqa: F401
from tests.test_train_step import examples, setup


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def assert_bit_identical(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_non_finite_step_is_skipped_bit_identically():
    """LoRA with EMA: a good step, a step with a NaN feature, a step whose loss overflows to inf
    (a target of 1e30: its squared error is inf in float32), then a good step again."""
    _, _, step, state, frozen, mesh = setup(LoRA(rank=2, lr_lora=1e-2, ema_decay=0.9, amp=False),
                                            HeadConfig(loss="mse"))
    good = make_batches(examples(2), 2)[0]
    state, m = step(state, frozen, shard_batch(good, mesh, 1))
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))

    nan_feat = {k: v.copy() for k, v in good.items()}
    nan_feat["msa_feat"][0, 1, 0, 3, 5] = np.nan  # one feature of the second example
    inf_loss = {k: v.copy() for k, v in good.items()}
    inf_loss["target"][0, 0] = 1e30
    for bad in (nan_feat, inf_loss):
        before = host({k: state[k] for k in ("trainable", "opt_state", "ema")})
        state, m = step(state, frozen, shard_batch(bad, mesh, 1))
        assert int(m["skipped"]) == 1
        assert not (np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])))
        assert_bit_identical(host({k: state[k] for k in ("trainable", "opt_state", "ema")}), before)

    before = host(state["trainable"])
    state, m = step(state, frozen, shard_batch(good, mesh, 1))
    assert int(m["skipped"]) == 0
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(host(state["trainable"])),
                                                        jax.tree_util.tree_leaves(before)))


def test_fit_counts_skips_and_stops_after_k_in_a_row():
    """Head-only fit on 4 examples, batch 1 (4 steps an epoch). One overflowing example: its step
    is skipped and counted in the epoch row; all overflowing: the 3rd step in a row stops the run."""
    cfg = tiny_config()
    exs = examples(4)
    strategy = HeadOnly(lr=1e-3, amp=False)
    variables = AffinityModel(cfg).init_variables(random_trunk(), strategy, jax.random.PRNGKey(0))
    one_bad = [dict(e) for e in exs]
    one_bad[2]["target"] = np.float32(1e30)
    res = fit(cfg, strategy, variables, one_bad, epochs=1, batch_size=1, normalize_targets=False,
              head_config=HeadConfig(loss="mse"), progress=False, max_skipped_steps=3)
    row = res.history[0]
    assert row["skipped_steps"] == 1 and np.isfinite(row["train_loss"])
    all_bad = [{**e, "target": np.float32(1e30)} for e in exs]
    with pytest.raises(SkippedStepsError, match=r"^epoch 1, step 3: 3 train steps in a row"):
        fit(cfg, strategy, variables, all_bad, epochs=1, batch_size=1, normalize_targets=False,
            head_config=HeadConfig(loss="mse"), progress=False, max_skipped_steps=3)


def test_non_finite_examples_are_refused_by_name():
    exs = examples(3)
    check_finite_examples(exs, "train")  # finite: accepted
    bad = [dict(e) for e in exs]
    bad[1] = {**bad[1], "pdb_id": "1abc", "target": np.float32(np.nan)}
    with pytest.raises(NonFiniteInputError, match=r"^1abc \(train\[1\]\): 'target' holds NaN"):
        check_finite_examples(bad, "train")
    bad[1] = {**exs[1], "msa_feat": np.full_like(exs[1]["msa_feat"], np.inf)}
    with pytest.raises(NonFiniteInputError, match=r"^val\[1\]: 'msa_feat' holds inf"):
        check_finite_examples(bad, "val")


def test_api_refuses_non_finite_examples(fast_weights, chain_examples):
    from molfun_jax.api import MolfunStructureModel
    from tests.product_data import fast_config

    model = MolfunStructureModel("tiny", HeadOnly(), weights=fast_weights, config=fast_config())
    bad = [dict(e) for e in chain_examples[:3]]
    bad[2]["target"] = np.float32(np.inf)
    pid = bad[2]["pdb_id"]
    with pytest.raises(NonFiniteInputError, match=rf"^{pid} \(train\[2\]\): 'target' holds inf"):
        model.fit(bad, epochs=1, progress=False)
    bad[2] = {**chain_examples[2], "seq_mask": np.full_like(chain_examples[2]["seq_mask"], np.nan)}
    with pytest.raises(NonFiniteInputError, match=rf"^{pid} \(examples\[2\]\): 'seq_mask' holds NaN"):
        model.predict(bad)

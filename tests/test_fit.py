"""The fit loop on real chains: every strategy learns a structure-derived target, frozen params
stay bit-identical; head-only cache = slow path; EMA validation, early stopping, best restore;
batching and step counts."""
import contextlib
import importlib
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from molfun_jax.heads import HeadConfig
from molfun_jax.training import (AffinityModel, Full, HeadOnly, LoRA, Partial, cache_trunk, count_steps, data_mesh,
                                 eval_params, evaluate, fit, make_batches, make_predict_step)
from tests.conftest import FIXTURES
from tests.finetune_common import random_trunk, synthetic_example, tiny_config

CHAINS = FIXTURES / "chains"
N_RES = 16


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """8 real chains, cropped to their first 16 residues (no ligand), with a structure-derived
    target: the radius of gyration of the whole chain's CA atoms / N_res**0.4 (a size-normalised
    compactness; chains carry no affinity labels)."""
    if not CHAINS.is_dir():
        pytest.skip(f"fixtures missing: {CHAINS}")
    from molfun_jax.data import AffinityDataset, DatasetConfig, FeatureConfig, parse_structure

    names = sorted(p.name.split(".")[0] for p in CHAINS.glob("*.pdb.gz"))[:8]
    rows = []
    for n in names:
        parsed = parse_structure(CHAINS / f"{n}.pdb.gz")
        ca = parsed["atom_positions"][:, 1][parsed["atom_mask"][:, 1] > 0]
        rg = np.sqrt(np.mean(np.sum((ca - ca.mean(0)) ** 2, axis=-1)))
        rows.append(f"{n},{rg / len(parsed['aatype']) ** 0.4}\n")
    csv = tmp_path_factory.mktemp("chains") / "chains.csv"
    csv.write_text("pdb_id,affinity\n" + "".join(rows))
    ds = AffinityDataset.from_csv(csv, CHAINS, config=DatasetConfig(buckets=(N_RES,), crop="contiguous",
                                                                   features=FeatureConfig(templates=False)))
    assert len(ds) == 8 and not ds.bad
    return list(ds)


def start(strategy, seed=0):
    model = AffinityModel(tiny_config())
    return model.init_variables(random_trunk(), strategy, jax.random.PRNGKey(seed))


def leaves(tree):
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()}


LEARNS = [  # (strategy, optimizer steps): the head alone on a random trunk's features needs more
    pytest.param(HeadOnly(lr=1e-2, amp=False), 100, id="head_only"),
    pytest.param(LoRA(lr_lora=3e-3, lr_head=1e-2, amp=False), 40, id="lora"),
    pytest.param(Partial(unfreeze_last_n=1, lr_trunk=1e-3, lr_head=1e-2, amp=False), 40, id="partial",
                 marks=pytest.mark.slow),
    pytest.param(Full(lr=1e-3, lr_head=1e-2, amp=False), 40, id="full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy,steps", LEARNS)
def test_strategy_learns_and_keeps_frozen_params(chains, strategy, steps):
    """A fixed step budget (batch 8 = all chains; head dropout off, so an epoch's train loss is
    the exact loss before its update). Targets are normalised: the mean predictor's MSE is 1."""
    variables = start(strategy)
    res = fit(tiny_config(), strategy, variables, chains, head_config=HeadConfig(dropout=0.0), epochs=steps,
              batch_size=8, seed=0)
    targets = res.norm.normalize(np.array([float(e["target"]) for e in chains]))
    baseline = float(np.mean((targets - targets.mean()) ** 2))
    assert baseline == pytest.approx(1.0, abs=1e-5)
    losses = [r["train_loss"] for r in res.history]
    assert losses[0] > baseline
    assert losses[-1] < 0.1 * baseline, losses
    assert res.best_epoch == int(np.argmin(losses)) + 1
    # frozen params (and frozen block slices) bit-identical; trained ones moved: every head leaf,
    # and leaves of every label (not all trunk leaves get a gradient: e.g. with one MSA row the
    # column attention's softmax is constant, so its q / k adapters get none)
    before, after = leaves(variables), leaves(res.variables)
    assert set(before) == set(after)
    moved = set()
    for p, w in before.items():
        rule = res.plan.rules.get(p)
        if rule is None:
            np.testing.assert_array_equal(after[p], w, err_msg=str(p))
        else:
            np.testing.assert_array_equal(after[p][:rule.start], w[:rule.start], err_msg=str(p))
            if not np.array_equal(after[p][rule.start:], w[rule.start:]):
                moved.add(p)
    assert {p for p in res.plan.rules if p[0] == "head"} <= moved
    assert {res.plan.rules[p].label for p in moved} == set(res.plan.learning_rates)
    assert len(moved) >= 0.5 * len(res.plan.rules), (len(moved), len(res.plan.rules))


def test_head_only_cache_matches_slow_path(chains):
    """Trunk outputs cached once vs the trunk run inside every step: same losses and params
    (head dropout on: the same keys reach the head on both paths)."""
    s = HeadOnly(lr=1e-2, amp=False, ema_decay=0.5)
    out = []
    for cache in (True, False):
        res = fit(tiny_config(), s, start(s), chains[:6], chains[6:], head_config=HeadConfig(dropout=0.2),
                  epochs=3, batch_size=2, cache=cache)
        out.append(res)
    fast, slow = out
    for a, b in zip(fast.history, slow.history):
        for k in ("train_loss", "val_loss", "val_rmse", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    for p, x in leaves(fast.variables).items():
        np.testing.assert_allclose(x, leaves(slow.variables)[p], rtol=1e-6, atol=1e-7, err_msg=str(p))
    assert fast.state["step"] == slow.state["step"] == 9


def test_ema_validation_early_stopping_and_best_restore(chains):
    """Validation runs on the EMA params; with val targets the negatives of the train targets
    (same inputs) the val loss rises as training fits: early stopping after `patience` epochs
    without improvement, and the result holds the best epoch's EMA params."""
    s = HeadOnly(lr=1e-2, amp=False, ema_decay=0.8, early_stopping_patience=2)
    val = [{**e, "target": np.float32(4.0 - float(e["target"]))} for e in chains]
    seen = {}

    def on_epoch_end(epoch, row, state, is_best):
        seen[epoch] = (jax.tree_util.tree_map(np.asarray, eval_params(state)), is_best)

    res = fit(tiny_config(), s, start(s), chains, val, head_config=HeadConfig(dropout=0.0), epochs=10, batch_size=4,
              on_epoch_end=on_epoch_end)
    hist = res.history
    assert len(hist) == 3 and res.best_epoch == 1, [r["val_loss"] for r in hist]
    assert hist[1]["val_loss"] > hist[0]["val_loss"] and [seen[e][1] for e in (1, 2, 3)] == [True, False, False]
    for p, x in leaves(seen[1][0]["head"]).items():
        np.testing.assert_array_equal(leaves(res.variables["head"])[p], x)
    # the last row's validation = the EMA params of the final state, not the raw ones
    mesh = data_mesh()
    val_n = [{**e, "target": np.float32(res.norm.normalize(float(e["target"])))} for e in val]
    cached = cache_trunk(res.model, res.variables, val_n, 4, mesh)
    predict = make_predict_step(res.model, res.plan, mesh)
    ema = evaluate(predict, res.state["ema"], res.frozen, cached, 4, mesh, res.norm, HeadConfig())
    raw = evaluate(predict, res.state["trainable"], res.frozen, cached, 4, mesh, res.norm, HeadConfig())
    assert hist[-1]["val_loss"] == pytest.approx(ema["loss"], rel=1e-6)
    assert hist[-1]["val_rmse"] == pytest.approx(ema["rmse"], rel=1e-6)
    assert abs(raw["loss"] - ema["loss"]) > 1e-4


def test_batches_and_step_count():
    cfg = tiny_config()
    exs = [synthetic_example(cfg, 8, i) for i in range(7)] + [synthetic_example(cfg, 12, 100 + i) for i in range(3)]
    groups = make_batches(exs, batch_size=2, accumulation_steps=3)
    # bucket 8: 7 examples -> 4 micro-batches -> 2 groups; bucket 12: 3 -> 2 micro-batches -> 1 group
    assert len(groups) == count_steps(exs, 2, 3) == 3 == math.ceil(4 / 3) + math.ceil(2 / 3)
    assert [g["weight"].shape for g in groups] == [(3, 2)] * 3
    assert sorted(float(g["weight"].sum()) for g in groups) == [1.0, 3.0, 6.0]
    assert groups[0]["aatype"].shape == (3, 2, 8) and groups[2]["msa_feat"].shape[:3] == (3, 2, 1)
    np.testing.assert_array_equal(groups[1]["weight"], [[1, 0], [0, 0], [0, 0]])  # 7th example + padding
    targets = sorted(float(t) for g in groups for t, w in zip(g["target"].ravel(), g["weight"].ravel()) if w)
    assert targets == sorted(float(e["target"]) for e in exs)
    shuffled = make_batches(exs, 2, 3, np.random.default_rng(0))
    assert len(shuffled) == 3 and sorted(float(g["weight"].sum()) for g in shuffled) == [1.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="target"):
        make_batches([{"aatype": np.zeros(3)}], 1)


def test_fit_releases_host_memory_once_per_compiled_batch_shape(monkeypatch):
    """The compiler's freed heap goes back to the OS after each new compile of the train step,
    before that step runs: two length buckets over two epochs (2 steps an epoch) compile twice.
    The steps reuse their buffers from the first compile to the end of training."""
    fit_module = importlib.import_module("molfun_jax.training.fit")  # the package's `fit` is the function
    calls = []

    @contextlib.contextmanager
    def reusing():
        calls.append("reuse")
        yield True
        calls.append("end")

    monkeypatch.setattr(fit_module, "release_host_memory", lambda: calls.append("release") or True)
    monkeypatch.setattr(fit_module, "reusing_host_buffers", reusing)
    on_step = lambda step, metrics: calls.append("step")  # noqa: E731
    cfg = tiny_config()
    exs = [synthetic_example(cfg, 8, i) for i in range(2)] + [synthetic_example(cfg, 12, 100 + i) for i in range(2)]
    strategy = HeadOnly(amp=False)
    fit(cfg, strategy, start(strategy), exs, epochs=2, batch_size=2, cache=False, progress=False, on_step=on_step)
    assert calls.count("release") == 2
    assert calls[:3] == ["release", "reuse", "step"] and calls[-1] == "end" and calls.count("reuse") == 1
    assert calls.count("step") == 4


def _with_ligand(ex: dict, n_res: int, atoms: int, seed: int) -> dict:
    """`ex` with random ligand features of `atoms` atoms (every schema key of the ligand head)."""
    from molfun_jax.feature_schema import FEATURE_SCHEMA, N_ATOM
    from molfun_jax.heads import LIGAND_HEAD_INPUT_KEYS

    r = np.random.default_rng(seed)
    lig = FEATURE_SCHEMA.zeros(LIGAND_HEAD_INPUT_KEYS, {"N_res": n_res, N_ATOM: atoms})
    return {**ex, **{k: r.standard_normal(v.shape).astype(v.dtype) for k, v in lig.items()}}


def test_ligand_atom_buckets_batch_together_padded_with_zeros():
    """With `merged_dims=(N_atom,)` examples of 16 and 32 ligand atoms share a batch: the
    16-atom one's ligand features padded with zeros (both atom axes of the bond features), its
    other features as they were; without, they are two buckets."""
    from molfun_jax.feature_schema import N_ATOM

    cfg = tiny_config()
    exs = [_with_ligand(synthetic_example(cfg, 8, i), 8, atoms, i) for i, atoms in enumerate((16, 32, 16))]
    assert len(make_batches(exs, 4)) == 2 == count_steps(exs, 4, 1)
    (batch,) = make_batches(exs, 4, merged_dims=(N_ATOM,))
    assert count_steps(exs, 4, 1, (N_ATOM,)) == 1
    np.testing.assert_array_equal(batch["weight"], [[1, 1, 1, 0]])
    small = exs[0]
    bond = batch["ligand_bond_feat"][0, 0]
    assert bond.shape[:2] == (32, 32)
    np.testing.assert_array_equal(bond[:16, :16], small["ligand_bond_feat"])
    assert not bond[16:].any() and not bond[:, 16:].any()
    np.testing.assert_array_equal(batch["ligand_mask"][0, 0], np.r_[small["ligand_mask"], np.zeros(16)])
    np.testing.assert_array_equal(batch["ligand_atom_feat"][0, 1], exs[1]["ligand_atom_feat"])
    np.testing.assert_array_equal(batch["aatype"][0, 0], small["aatype"])


def test_batches_hold_only_what_the_model_reads(monkeypatch):
    """Ligand features of two atom buckets (16, 32) and 4 examples, batch 4. Where the trunk runs,
    one bucket, 1 step an epoch, one compile: the pocket head does not read them (they are left
    out), the ligand head reads them padded to 32 atoms. On cached trunk outputs (head-only) the
    ligand head's atom buckets stay apart: 2 steps, two compiles."""
    from molfun_jax.heads import LigandHeadConfig

    fit_module = importlib.import_module("molfun_jax.training.fit")
    compiles = []
    monkeypatch.setattr(fit_module, "release_host_memory", lambda: compiles.append(1) or True)
    cfg = tiny_config()
    exs = [_with_ligand(synthetic_example(cfg, 8, i), 8, atoms, i) for i, atoms in enumerate((16, 32, 16, 32))]
    for head, cache, steps in ((HeadConfig(), False, 1), (LigandHeadConfig(c_atom=8), False, 1),
                               (LigandHeadConfig(c_atom=8), True, 2)):
        compiles.clear()
        strategy = HeadOnly(amp=False, accumulation_steps=1)
        model = AffinityModel(cfg, head)
        variables = model.init_variables(random_trunk(), strategy, jax.random.PRNGKey(0))
        res = fit(cfg, strategy, variables, exs, head_config=head, epochs=1, batch_size=4, cache=cache,
                  progress=False)
        assert res.history[-1]["step"] == steps and len(compiles) == steps, (head.kind, cache)
        kept = model.inputs(exs[0])
        assert ("ligand_atom_feat" in kept) == (head.kind == "ligand") and "target" in kept

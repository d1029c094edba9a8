"""Checkpoints (molfun_jax.checkpoint) through the Python API (molfun_jax.api) on the `tiny`
preset and 8 real fixture chains cropped to 16 residues, labelled with a structure-derived
compactness score (radius of gyration / N^0.4; tests/product_data.py): train -> save -> load ->
predict is bit-exact for LoRA and for full fine-tuning, the merged export within 1e-5; contents
per strategy; keep-N; the best checkpoint holds the evaluated (EMA) params; interrupted writes;
resume; refusing another preset / strategy / config."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from molfun_jax import checkpoint as ckpt
from molfun_jax.api import MolfunStructureModel
from molfun_jax.pretrained import random_trunk
from molfun_jax.training import Full, HeadOnly, LoRA
from tests.product_data import (chain_examples, compile_cache, data_csv, fast_config, fast_weights,  # noqa: F401
                                write_weights)

EXPORT_TOL = 1e-5


def make_model(weights, strategy, **kw) -> MolfunStructureModel:
    return MolfunStructureModel("tiny", strategy, weights=weights, config=fast_config(), **kw)


def leaves(path) -> set[tuple[str, ...]]:
    got = ckpt.restore(path, items=("trainable",))["trainable"]
    return set(traverse_util.flatten_dict(got))


def assert_export_close(ref: np.ndarray, got: np.ndarray) -> None:
    rel = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12)
    assert rel <= EXPORT_TOL, f"export differs from the LoRA model: rel {rel:.2e}"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, fast_weights, chain_examples):
    """A LoRA model (EMA on) trained 3 epochs with per-epoch checkpoints, keep 2 (kept in
    memory), and each epoch's checkpointed `ema` / `trainable` items read back as it ends."""
    run = tmp_path_factory.mktemp("lora_run")
    model = make_model(fast_weights, LoRA(rank=4, lr_lora=1e-2, ema_decay=0.5, amp=False))
    per_epoch = {}

    def grab(row, m):
        per_epoch[row["epoch"]] = ckpt.restore(run / "checkpoints" / str(row["epoch"]), items=("ema", "trainable"))

    model.fit(chain_examples[:4], chain_examples[4:6], epochs=3, batch_size=2, output=run, keep=2, progress=False,
              on_epoch_end=grab)
    return model, run, per_epoch


def test_lora_save_load_predict_bit_exact(lora_run, chain_examples, tmp_path):
    model, run, _ = lora_run
    p_mem = model.predict(chain_examples)
    assert np.all(np.isfinite(p_mem)) and np.ptp(p_mem) > 0
    # the run folder (its best epoch), an explicit save, and load_checkpoint into a fresh model
    assert np.array_equal(MolfunStructureModel.load(run).predict(chain_examples), p_mem)
    saved = model.save(tmp_path / "saved")
    loaded = MolfunStructureModel.load(tmp_path / "saved")
    assert np.array_equal(loaded.predict(chain_examples), p_mem)
    assert loaded.norm == model.norm and loaded.strategy == model.strategy
    fresh = make_model(model.base_weights["path"], model.strategy)
    assert not np.array_equal(fresh.predict(chain_examples), p_mem)
    assert np.array_equal(fresh.load_checkpoint(saved).predict(chain_examples), p_mem)
    # LoRA checkpoints hold the head and the adapters' a, b only (no trunk)
    kinds = {p[0] for p in leaves(saved)}
    assert kinds == {"head", "lora"}
    assert {p[-1] for p in leaves(saved) if p[0] == "lora"} == {"a", "b"}


def test_lora_merge_export(lora_run, chain_examples, tmp_path):
    model, _, _ = lora_run
    p_mem = model.predict(chain_examples)
    trunk = jax.tree_util.tree_map(np.copy, model.variables["trunk"])
    assert_export_close(p_mem, model.merge().predict(chain_examples))
    with pytest.raises(RuntimeError, match="merged"):
        model.save(tmp_path / "no")
    model.unmerge()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trunk),
                                                    jax.tree_util.tree_leaves(model.variables["trunk"])))
    assert np.array_equal(model.predict(chain_examples), p_mem)
    out = model.export(tmp_path / "export")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == ckpt.EXPORT_FORMAT and meta["exported_from"]["name"] == "lora"
    exported = MolfunStructureModel.load(out)
    assert exported.variables["lora"] == {}
    assert_export_close(p_mem, exported.predict(chain_examples))
    # the model is still the unmerged LoRA model after exporting
    assert np.array_equal(model.predict(chain_examples), p_mem)


@pytest.mark.slow  # ~30 s; the LoRA save/load test runs by default
def test_full_save_load_predict_bit_exact(fast_weights, chain_examples, tmp_path):
    model = make_model(fast_weights, Full(lr=1e-3, amp=False))
    model.fit(chain_examples[:4], epochs=1, batch_size=2, progress=False)  # in memory, no output
    p_mem = model.predict(chain_examples)
    saved = model.save(tmp_path / "full")
    loaded = MolfunStructureModel.load(tmp_path / "full")
    assert np.array_equal(loaded.predict(chain_examples), p_mem)
    # full fine-tuning stores the trained trunk (Evoformer, embedders, ...) but not the frozen aux heads
    kinds = {p[:2] for p in leaves(saved)}
    assert ("trunk", "evoformer") in kinds and ("trunk", "input_embedder") in kinds
    assert not any(p[1] == "aux_heads" for p in kinds if p[0] == "trunk")
    trained = jax.tree_util.tree_leaves(loaded.variables["trunk"]["evoformer"])
    base = jax.tree_util.tree_leaves(make_model(fast_weights, Full()).variables["trunk"]["evoformer"])
    assert not any(np.array_equal(a, b) for a, b in zip(trained, base) if a.size > 1)
    assert_export_close(p_mem, MolfunStructureModel.load(model.export(tmp_path / "exp")).predict(chain_examples))


def test_keep_n_and_best_holds_evaluated_ema_params(lora_run, chain_examples):
    model, run, per_epoch = lora_run
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 3]
    best_dirs = list((run / "best").iterdir())
    assert len(best_dirs) == 1 and int(best_dirs[0].name) == model.best_epoch
    val = [h["val_loss"] for h in model.history]
    assert model.best_epoch == 1 + int(np.argmin(val))
    best = ckpt.restore(best_dirs[0], items=("trainable",))["trainable"]
    ema, raw = per_epoch[model.best_epoch]["ema"], per_epoch[model.best_epoch]["trainable"]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),  # noqa: E731
                                                                   jax.tree_util.tree_leaves(b)))
    assert same(best, ema) and not same(best, raw)
    # what the model holds at the end is what was evaluated at the best epoch
    assert np.isclose(model.evaluate(chain_examples[4:6])["rmse"], model.history[model.best_epoch - 1]["val_rmse"],
                      rtol=1e-6)


@pytest.mark.slow  # the SIGKILL test of test_cli.py covers resume by default
def test_resume_equals_uninterrupted(fast_weights, chain_examples, tmp_path):
    """An exception after epoch 2 (checkpoint written) then resume == 4 epochs in one go: data
    order, dropout keys, optimizer and EMA state all continue."""
    strat = HeadOnly(lr=3e-3, ema_decay=0.5, amp=False)
    kw = dict(epochs=4, batch_size=1, progress=False)
    train, val = chain_examples[:4], chain_examples[4:6]
    ref = make_model(fast_weights, strat).fit(train, val, output=tmp_path / "a", **kw)

    class Killed(Exception):
        pass

    def die(row, m):
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        make_model(fast_weights, strat).fit(train, val, output=tmp_path / "b", on_epoch_end=die, **kw)
    resumed = make_model(fast_weights, strat)
    hist = resumed.fit(train, val, output=tmp_path / "b", resume=True, **kw)
    strip = lambda h: json.dumps([{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h])  # noqa: E731
    assert strip(hist) == strip(ref)  # (as JSON text: NaN metrics compare equal)
    assert np.array_equal(resumed.predict(val), MolfunStructureModel.load(tmp_path / "a").predict(val))


def test_chunk_size_changes_memory_not_predictions(lora_run, fast_weights, chain_examples):
    """`chunk_size=2` (below the 16-residue crop: every chunked layer runs in several chunks)
    predicts what the unchunked model predicts, with the same variables."""
    model, _, _ = lora_run
    chunked = make_model(fast_weights, model.strategy, chunk_size=2)
    assert chunked.config.globals.chunk_size == 2 and model.config.globals.chunk_size is None
    chunked.variables, chunked.norm = model.variables, model.norm
    ref, got = model.predict(chain_examples[:2]), chunked.predict(chain_examples[:2])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        make_model(fast_weights, model.strategy, chunk_size=0)


def test_remat_choice_is_the_models_and_a_checkpoint_loads_across_it(lora_run, fast_weights):
    """`remat=` sets how the model's blocks train (`config.with_remat`); a checkpoint trained with
    the default loads into a model without remat (remat changes memory, not the numbers)."""
    model, run, _ = lora_run
    off = make_model(fast_weights, model.strategy, remat="off")
    assert not off.config.globals.remat and model.config.globals.remat
    off.load_checkpoint(run)
    assert make_model(fast_weights, model.strategy, remat="dots_saveable").config.globals.remat_policy == "dots_saveable"
    with pytest.raises(ValueError, match="remat policy 'never'"):
        make_model(fast_weights, model.strategy, remat="never")


def test_refuses_another_preset_strategy_or_config(lora_run, fast_weights):
    _, run, _ = lora_run
    with pytest.raises(ckpt.CheckpointError, match=r"strategy\.name: 'lora' in the checkpoint, 'full' here"):
        make_model(fast_weights, Full(amp=False)).load_checkpoint(run)
    with pytest.raises(ckpt.CheckpointError, match=r"lora\.rank: 4 in the checkpoint, 8 here"):
        make_model(fast_weights, LoRA(rank=8, amp=False)).load_checkpoint(run)
    with pytest.raises(ckpt.CheckpointError, match="'tiny' model .* cannot be loaded as preset 'model_1_ptm'"):
        MolfunStructureModel.load(run, preset="model_1_ptm")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded as strategy 'partial'"):
        MolfunStructureModel.load(run, strategy="partial")
    # a different architecture (another preset's config) is named key by key
    other = fast_config()
    other.model.evoformer_stack.no_blocks = 3
    meta = ckpt.read_meta(run)
    mine = make_model(fast_weights, LoRA(rank=4, amp=False))
    with pytest.raises(ckpt.CheckpointError, match=r"model_config\.evoformer_stack\.no_blocks: 2 in the checkpoint, 3"):
        ckpt.check_compatible(mine._compat(meta), mine._compat({**meta, "model_config": other.to_dict()}))


def test_locate_and_interrupted_writes(lora_run, tmp_path):
    _, run, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # a write killed half-way leaves orbax's temporary folder: never picked, removed on next open
    tmp = copy / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    tmp.mkdir()
    (tmp / "junk").write_text("partial")
    assert ckpt.locate(copy).parent.name == "best"
    assert ckpt.locate(copy / "checkpoints").name == "3"
    runs = ckpt.RunCheckpointer(copy)
    assert runs.latest_epoch() == 3
    runs.close()
    assert not tmp.exists()
    for bad in (tmp_path / "nope", tmp_path):
        with pytest.raises(ckpt.CheckpointError, match="no such checkpoint|not a molfun_jax checkpoint"):
            ckpt.locate(bad)
    # best/ holds parameters only: resuming from it is refused clearly
    with pytest.raises(ckpt.CheckpointError, match="parameters only"):
        ckpt.restore(ckpt.locate(copy), items=("opt_state",))


def test_base_weights_are_rebuilt_or_refused(lora_run, tmp_path, chain_examples):
    model, run, _ = lora_run
    assert model.base_weights["kind"] == "converted"
    moved = tmp_path / "moved_weights"
    shutil.copytree(model.base_weights["path"], moved)
    p = MolfunStructureModel.load(run, weights=moved).predict(chain_examples[:2])
    assert np.array_equal(p, model.predict(chain_examples[:2]))
    meta_path = next((run / "best").iterdir()) / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    gone = tmp_path / "gone_run"
    shutil.copytree(run, gone)
    meta["base_weights"]["path"] = str(tmp_path / "missing")
    (next((gone / "best").iterdir()) / "meta" / "metadata").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="base weights of this checkpoint .* are gone"):
        MolfunStructureModel.load(gone)
    other = write_weights(tmp_path / "other_weights", fast_config(), seed=1)
    with pytest.raises(ckpt.CheckpointError, match="are not the ones this checkpoint was trained on"):
        MolfunStructureModel.load(run, weights=other)


@pytest.mark.slow  # compiles the model init (~15 s); the demo test also rebuilds random weights
def test_random_trunk_is_reproducible():
    cfg = fast_config()
    a, b = random_trunk(cfg, 3), random_trunk(cfg, 3)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    c = random_trunk(cfg, 4)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(c)))

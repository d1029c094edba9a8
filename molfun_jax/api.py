"""The Python API, `MolfunStructureModel`: an AlphaFold trunk + affinity head, a fine-tuning
strategy, and `fit` / `predict` / `save` / `load` / `merge` / `unmerge` / `export`.

    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.training import LoRA
    model = MolfunStructureModel("model_1_ptm", LoRA(rank=8), weights="finetuning_ptm_2.pt")
    history = model.fit(train_examples, val_examples, epochs=10, output="runs/lora1")
    preds = model.predict(test_examples)          # affinities, original units
    model.save("my_model"); model = MolfunStructureModel.load("my_model")
    model.export("merged/")                       # LoRA folded in, inference only

Examples are dicts of numpy features (one example; `molfun_jax.data`) with a scalar `target`.

The frozen base trunk is never written to checkpoints: `meta.base_weights` says where it comes
from (`molfun_jax.pretrained`), and `load` rebuilds it from there (or from `weights=`).
Checkpoints hold what the strategy trains. `fit(..., tracker=make_tracker("mlflow"))` logs each
step and epoch to an experiment tracker (`molfun_jax.tracking`). See docs/architecture.md.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections as mlc
import numpy as np

from molfun_jax import checkpoint as ckpt
from molfun_jax import lora as lora_lib
from molfun_jax.config import config_from_dict, config_to_dict, model_config, with_remat
from molfun_jax.data.ligand import LigandConfig
from molfun_jax.heads.affinity import HeadConfig, TargetNorm
from molfun_jax.heads.registry import head_config_from_dict, head_kind
from molfun_jax.pretrained import count_params, load_base_weights, rebuild_base_weights, versions
from molfun_jax.tracking import Tracker, epoch_metrics, step_metrics
from molfun_jax.training import (MAX_SKIPPED_STEPS, TRUNK_MERGED_DIMS, AffinityModel, HeadOnly, LoRA, Strategy,
                                 check_finite_examples, count_steps, data_mesh, eval_params, fit, init_state,
                                 make_predict_step, predict_all, strategy_from_dict, target_norm, with_dtype)

Example = Mapping[str, Any]


class MolfunStructureModel:
    """AlphaFold trunk + affinity head + a fine-tuning strategy (see the module docstring).

    preset: `model_1`..`model_5[_ptm]` or `tiny`; `config` overrides it (a `model_config` tree).
    strategy: `HeadOnly`, `LoRA` (default), `Partial` or `Full` (`molfun_jax.training`).
    weights: None (random), an OpenFold `.pt` or a converted folder.
    num_recycles: None = the preset's. chunk_size: None (off) or the rows per chunk of the
    attention, outer product mean and transition layers, in training too (memory for recompute;
    the numbers do not change). remat: None = the config's (training: 'auto', by crop size and
    device), or one of `config.REMAT_CHOICES`: what each rematerialised block of the stacks keeps
    for its backward, or 'off' (no recompute: faster, much more memory; the numbers do not change).
    seed: head / adapter init, data order, dropout (and the
    trunk init without weights). head_config: any registered head's config (`HeadConfig`, the
    pocket head, by default; `LigandHeadConfig`, the ligand head). ligand_config: the ligand
    featurisation the examples were made with (recorded in meta for the ligand head).
    """

    def __init__(self, preset: str = "model_1_ptm", strategy: Optional[Strategy] = None, *,
                 weights: Optional[str | Path] = None, num_recycles: Optional[int] = None,
                 chunk_size: Optional[int] = None, remat: Optional[str] = None, head_config: Optional[Any] = None,
                 ligand_config: Optional[LigandConfig] = None, seed: int = 0,
                 config: Optional[mlc.ConfigDict] = None, cache_dir: Optional[str | Path] = None,
                 log: Optional[Callable[[str], None]] = None, data_info: Optional[Mapping[str, Any]] = None,
                 _base: Optional[tuple[dict, dict]] = None) -> None:
        self.preset = preset
        self.config = copy.deepcopy(config) if config is not None else model_config(preset, train=True)
        if num_recycles is not None:
            if num_recycles < 0:
                raise ValueError(f"num_recycles must be >= 0, got {num_recycles}")
            self.config.globals.num_recycles = int(num_recycles)
        if chunk_size is not None:
            if chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
            self.config.globals.chunk_size = int(chunk_size)
        if remat is not None:
            self.config = with_remat(self.config, remat)
        self.strategy = strategy if strategy is not None else LoRA()
        self.head_config = head_config or HeadConfig()
        head_kind(self.head_config)  # a registered head
        self.ligand_config = ligand_config or LigandConfig()
        self.seed = int(seed)
        trunk, self.base_weights = _base or load_base_weights(weights, self.config, preset, self.seed, cache_dir, log)
        self.variables = AffinityModel(self.config, self.head_config).init_variables(
            trunk, self.strategy, jax.random.PRNGKey(self.seed + 1))
        self.norm = TargetNorm()
        self.history: list[dict] = []
        self.best_epoch = 0
        self.data_info: dict[str, Any] = dict(data_info or {})  # dataset description stored in meta (max_len)
        self.exported_from: Optional[dict] = None  # an export's original strategy (`load` of an export)
        self._merged: Optional[tuple[dict, dict]] = None  # (adapters, overwritten kernels) while merged
        self._predictors: dict[Any, Callable] = {}
        self._mesh = data_mesh()

    # --- description ------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """AlphaFold trunk parameters (93,237,338 for model_1_ptm)."""
        return count_params(self.variables["trunk"])

    def trainable_counts(self) -> dict[str, int]:
        """Trained parameters per optimizer label (`head`, `lora`, `trunk`, `blocks`, ...) and total."""
        return self.strategy.plan(self.variables, self.head_config.source).count(self.variables)

    @property
    def compute_dtype(self) -> str:
        return self.strategy.compute_dtype

    def meta(self) -> dict[str, Any]:
        s = self.strategy.to_dict()
        lcfg = self.strategy.lora_config()
        return {"format": ckpt.FORMAT, "preset": self.preset, "model_config": config_to_dict(self.config),
                "strategy": s, "head": self.head_config.to_dict(),
                "ligand_features": self.ligand_config.meta() if head_kind(self.head_config).input_keys else None,
                "lora": lcfg.to_dict() if lcfg is not None else None,
                "norm": self.norm.to_dict(), "base_weights": self.base_weights, "seed": self.seed,
                "data": self.data_info,
                "compute_dtype": self.compute_dtype, "num_params": self.num_params, "versions": versions()}

    def _compat(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The parts of a meta that a checkpoint must share with this model."""
        structural = self.strategy.structural_fields()
        return {"preset": meta.get("preset"),
                "strategy": {k: v for k, v in (meta.get("strategy") or {}).items() if k in structural},
                "model_config": (meta.get("model_config") or {}).get("model"),
                "head": head_config_from_dict(meta["head"]).to_dict() if meta.get("head") else None,
                "lora": meta.get("lora")}

    def check_checkpoint(self, meta: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Refuse a checkpoint of another head, preset / strategy / config (CheckpointError)."""
        check_head(meta, self.head_config.kind, source)
        ckpt.check_compatible(self._compat(meta), self._compat(self.meta()), source)

    # --- training ---------------------------------------------------------------------------
    def fit(self, train: Sequence[Example], val: Optional[Sequence[Example]] = None, *, epochs: int = 10,
            batch_size: int = 2, output: Optional[str | Path] = None, keep: int = 3, resume: bool = False,
            normalize_targets: bool = True, progress: Optional[bool] = None,
            on_epoch_end: Optional[Callable[[dict, "MolfunStructureModel"], None]] = None,
            tracker: Optional[Tracker] = None, max_skipped_steps: int = MAX_SKIPPED_STEPS) -> list[dict]:
        """Fine-tune on `train`, validating on `val` each epoch; returns the history (one dict
        per epoch: train_loss, val_loss, val_rmse/mae/pearson/spearman, lr, ...).

        With `output`, a checkpoint is written after every epoch (the last `keep` are kept) and
        the best epoch's evaluated params under `output/best`; `resume=True` continues from the
        last one (same data, seed and settings give the same losses as an uninterrupted run).
        At the end the model holds the best epoch's params (EMA ones when EMA is on).
        `on_epoch_end(row, model)` runs after each epoch's checkpoint. `tracker`
        (`molfun_jax.tracking.make_tracker`) gets each step's loss / LR / grad norm and each
        epoch's row; the caller closes it. Examples holding NaN / inf are refused;
        `max_skipped_steps` non-finite train steps in a row stop the run.
        """
        if self._merged is not None:
            raise RuntimeError("the model is merged (inference only): unmerge() before fit()")
        check_finite_examples(train, "train")
        check_finite_examples(val or [], "val")
        runs = ckpt.RunCheckpointer(output, keep) if output is not None else None
        state = history = norm = None
        if resume:
            if runs is None:
                raise ValueError("resume=True needs the output folder of the run")
            state, history, norm = self._restore_run(runs, train, epochs, batch_size)
        rows: list[dict] = list(history or [])
        best = {"epoch": max([r["epoch"] for r in rows if r.get("best")], default=0)}

        def epoch_end(epoch: int, row: dict, st: dict, is_best: bool) -> None:
            row = {**row, "best": bool(is_best)}
            rows.append(row)
            if is_best:
                best["epoch"] = epoch
            trainer = {"epoch": epoch, "step": int(st["step"]), "history": rows, "best_epoch": best["epoch"],
                       "norm": self.norm.to_dict()}
            if runs is not None:
                meta = self.meta()
                if is_best:
                    runs.save_best(epoch, params=eval_params(st), meta=meta, trainer=trainer)
                runs.save(epoch, trainable=st["trainable"], ema=st.get("ema"),
                          opt_state={"opt_state": st["opt_state"], "step": st["step"], "rng": st["rng"]},
                          meta=meta, trainer=trainer)
            if tracker is not None:
                tracker.log_metrics(epoch_metrics(row), int(st["step"]))
            if on_epoch_end is not None:
                on_epoch_end(row, self)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            tracker.log_metrics(step_metrics(metrics), step)

        self.norm = norm if norm is not None else target_norm(train, normalize_targets)
        result = fit(self.config, self.strategy, self.variables, train, val, head_config=self.head_config,
                     epochs=epochs, batch_size=batch_size, seed=self.seed, norm=self.norm, progress=progress,
                     on_epoch_end=epoch_end, on_step=on_step if tracker is not None else None, state=state,
                     history=history, max_skipped_steps=max_skipped_steps)
        self.history = rows
        self.best_epoch = best["epoch"]
        if runs is not None:
            runs.close()
            if self.best_epoch:  # the best params as written (also when this call resumed past them)
                self._load_trainable(ckpt.locate(Path(output) / "best"), trainer_state=False)
                return rows
        self.variables = jax.tree_util.tree_map(np.asarray, result.variables)
        return rows

    def _restore_run(self, runs: ckpt.RunCheckpointer, train: Sequence[Example], epochs: int,
                     batch_size: int) -> tuple[dict, list, TargetNorm]:
        plan = self.strategy.plan(self.variables, self.head_config.source)
        tx = plan.optimizer(epochs * count_steps(train, batch_size, self.strategy.accumulation_steps))
        abstract = jax.eval_shape(lambda v: init_state(plan, v, tx, jax.random.PRNGKey(0),
                                                       self.strategy.ema_decay)[0], self.variables)
        _, got = runs.restore_intact({"trainable": abstract["trainable"], "ema": abstract.get("ema"),
                                      "opt_state": {k: abstract[k] for k in ("opt_state", "step", "rng")}},
                                     items=("trainable", "ema", "opt_state", "trainer"),
                                     check=lambda meta, path: self.check_checkpoint(meta, str(path)))
        state = {"trainable": got["trainable"], **got["opt_state"]}
        if "ema" in got:
            state["ema"] = got["ema"]
        trainer = got["trainer"]
        return state, trainer["history"], TargetNorm(**trainer["norm"])

    # --- inference --------------------------------------------------------------------------
    def _predictor(self) -> tuple[AffinityModel, Callable, Any, Any]:
        """(model, its jitted predict step, trainable, frozen) for the current variables."""
        plan = self.strategy.plan(self.variables, self.head_config.source)
        trainable, frozen = plan.split(self.variables)
        model = AffinityModel(with_dtype(self.config, self.compute_dtype), self.head_config)
        key = tuple(sorted(plan.rules.items()))
        if key not in self._predictors:
            self._predictors[key] = make_predict_step(model, plan, self._mesh)
        return model, self._predictors[key], trainable, frozen

    def predict(self, examples: Sequence[Example], batch_size: int = 2) -> np.ndarray:
        """Predicted affinities (original units) of `examples`, in order."""
        if not examples:
            return np.zeros((0,), np.float64)
        check_finite_examples(examples)
        model, step, trainable, frozen = self._predictor()
        exs = [{"target": np.float32(0.0), **model.inputs(e)} for e in examples]
        p, _ = predict_all(step, trainable, frozen, exs, batch_size, self._mesh, TRUNK_MERGED_DIMS)
        return np.asarray(self.norm.denormalize(p), np.float64)

    def evaluate(self, examples: Sequence[Example], batch_size: int = 2) -> dict[str, Any]:
        """RMSE, MAE, Pearson r, Spearman rho (original units) plus predictions and targets."""
        from molfun_jax.reports import regression_metrics

        pred = self.predict(examples, batch_size)
        true = np.asarray([float(np.asarray(e["target"])) for e in examples])
        return {**regression_metrics(true, pred), "predictions": pred, "targets": true}

    # --- LoRA merge -------------------------------------------------------------------------
    def merge(self) -> "MolfunStructureModel":
        """Fold the LoRA adapters into the trunk kernels (inference; `unmerge` restores)."""
        if self._merged is not None:
            raise RuntimeError("already merged")
        adapters = self.variables.get("lora") or {}
        if not adapters:
            raise RuntimeError(f"strategy {self.strategy.name!r} has no LoRA adapters to merge")
        merged, base = lora_lib.merge(self.variables["trunk"], adapters, return_base=True)
        self._merged = (adapters, base)
        self.variables = {**self.variables, "trunk": merged, "lora": {}}
        return self

    def unmerge(self) -> "MolfunStructureModel":
        """Undo `merge` bit-exactly."""
        if self._merged is None:
            raise RuntimeError("not merged")
        adapters, base = self._merged
        trunk = lora_lib.unmerge(self.variables["trunk"], adapters, base)
        self.variables = {**self.variables, "trunk": trunk, "lora": adapters}
        self._merged = None
        return self

    # --- persistence ------------------------------------------------------------------------
    def _trainable(self) -> Any:
        plan = self.strategy.plan(self.variables, self.head_config.source)
        return plan.split(self.variables)[0]

    def save(self, path: str | Path) -> Path:
        """Write what the strategy trains + meta (a checkpoint `load` and predict.py read)."""
        if self._merged is not None:
            raise RuntimeError("the model is merged: unmerge() before save(), or export() for inference")
        epoch = max(self.best_epoch, 0)
        trainer = {"epoch": epoch, "history": self.history, "best_epoch": self.best_epoch,
                   "norm": self.norm.to_dict()}
        return ckpt.save_checkpoint(path, epoch, {"trainable": self._trainable(), "meta": self.meta(),
                                                  "trainer": trainer})

    def _load_trainable(self, path: Path, trainer_state: bool = True) -> None:
        """Put a checkpoint's trained params into the variables (and, with `trainer_state`, its
        normalisation, history and best epoch)."""
        plan = self.strategy.plan(self.variables, self.head_config.source)
        trainable_abs, frozen = jax.eval_shape(plan.split, self.variables)[0], plan.split(self.variables)[1]
        got = ckpt.restore(path, {"trainable": trainable_abs}, items=("trainable", "trainer"))
        self.variables = jax.tree_util.tree_map(np.asarray, plan.combine(got["trainable"], frozen))
        if not trainer_state:
            return
        t = got["trainer"]
        self.norm = TargetNorm(**t["norm"])
        self.history = t.get("history", [])
        self.best_epoch = t.get("best_epoch", 0)

    def load_checkpoint(self, path: str | Path) -> "MolfunStructureModel":
        """Load a checkpoint's trained params into this model (same preset / strategy / config)."""
        p = ckpt.locate(path)
        if ckpt.is_export(p):
            raise ckpt.CheckpointError(f"{p} is a merged export: use MolfunStructureModel.load")
        self.check_checkpoint(ckpt.read_meta(p), str(p))
        self._load_trainable(p)
        return self

    @classmethod
    def load(cls, path: str | Path, *, weights: Optional[str | Path] = None, preset: Optional[str] = None,
             strategy: Optional[str] = None, head: Optional[str] = None) -> "MolfunStructureModel":
        """Rebuild a model from a checkpoint, run folder (its best epoch) or export. `preset` /
        `strategy` / `head` (names), when given, must match the checkpoint's."""
        p = ckpt.locate(path)
        meta = ckpt.read_meta(p)
        if head is not None:
            check_head(meta, head, str(p))
        got = {"preset": meta["preset"], "strategy": meta["strategy"]["name"]}
        for k, v in (("preset", preset), ("strategy", strategy)):
            if v is not None and v != got[k]:
                raise ckpt.CheckpointError(f"{p} holds a {got['preset']!r} model fine-tuned with strategy "
                                           f"{got['strategy']!r}; it cannot be loaded as {k} {v!r}")
        config = config_from_dict(meta["model_config"])
        head = head_config_from_dict(meta["head"])
        lig = meta.get("ligand_features")
        try:
            ligand = LigandConfig.from_meta(lig) if lig else None
        except ValueError as e:
            raise ckpt.CheckpointError(f"{p}: {e}") from None
        if ckpt.is_export(p):
            params, head_params, _ = ckpt.read_export(p)
            m = cls(meta["preset"], HeadOnly(amp=meta["compute_dtype"] == "bfloat16"), config=config,
                    head_config=head, ligand_config=ligand, seed=meta.get("seed", 0), data_info=meta.get("data"),
                    _base=(params, meta["base_weights"]))
            m.variables = {"trunk": params, "head": head_params, "lora": {}}
            m.norm = TargetNorm(**meta["norm"])
            m.exported_from = meta.get("exported_from")
            return m
        strat = strategy_from_dict(meta["strategy"])
        base = rebuild_base_weights(meta["base_weights"], config, meta["preset"], weights)
        m = cls(meta["preset"], strat, config=config, head_config=head, ligand_config=ligand, seed=meta["seed"],
                data_info=meta.get("data"), _base=base)
        m.check_checkpoint(meta, str(p))
        m._load_trainable(p)
        return m

    def export(self, path: str | Path) -> Path:
        """A merged, inference-only model (whole trunk with LoRA folded in + head + meta)."""
        was_merged = self._merged is not None
        if self.variables.get("lora") and not was_merged:
            self.merge()
        try:
            meta = {**self.meta(), "strategy": {"name": "merged"}, "lora": None,
                    "exported_from": self.strategy.to_dict()}
            return ckpt.write_export(path, self.variables["trunk"], self.variables["head"], meta)
        finally:
            if self._merged is not None and not was_merged:
                self.unmerge()


def check_head(meta: Mapping[str, Any], kind: str, source: str = "checkpoint") -> None:
    """Refuse a checkpoint whose head is not of `kind` (CheckpointError naming both)."""
    got = (meta.get("head") or {}).get("kind", "pocket")
    if got != kind:
        raise ckpt.CheckpointError(f"{source} holds a model with the {got!r} affinity head; it cannot be loaded "
                                   f"into the {kind!r} head (its params differ): use --head {got}, or train a new "
                                   f"{kind} model")


def export_checkpoint(src: str | Path, out: str | Path, weights: Optional[str | Path] = None) -> Path:
    """`scripts/export.py`: a checkpoint / run folder -> merged inference-only export."""
    return MolfunStructureModel.load(src, weights=weights).export(out)

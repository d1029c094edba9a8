"""Model configuration mirroring OpenFold v1.0's `openfold.config.model_config`.

The tree has OpenFold's key names (`globals`, `model.evoformer_stack.no_blocks`, ...) so that
`from_openfold` is a copy, plus fields of ours under `globals`:
`num_recycles` (static recycling count), `dtype` (compute dtype), `remat` (rematerialise each
scanned block in the backward pass) and `remat_policy` (what a rematerialised block may keep from
its forward, a `jax.checkpoint_policies` name, see `REMAT_POLICIES`).
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections as mlc

PRESETS = tuple(f"model_{i}" for i in range(1, 6)) + tuple(f"model_{i}_ptm" for i in range(1, 6))
TINY = "tiny"
# globals.remat_policy -> what a rematerialised block saves for its backward besides its input:
# nothing (recompute the whole block); statistics (the small values named below, so the recompute
# skips the pair transition's first matmul and every LayerNorm's reductions); matmul outputs, or
# matmuls without batch dimensions (the projections; attention logits and triangle products are
# recomputed), each with the statistics; 'auto' (the training default) picks by crop size, see
# `resolve_remat_policy`.
REMAT_POLICIES = ("nothing_saveable", "statistics_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "auto")
# what a training run may ask for (`with_remat`): a policy, or 'off' (no block is rematerialised: the
# backward reads every block's activations, kept from the forward; the fastest step where they fit,
# README.md gives the numbers)
REMAT_OFF = "off"
REMAT_CHOICES = REMAT_POLICIES + (REMAT_OFF,)
# 'auto' saves matmul outputs up to this many residues on an accelerator (their memory grows with
# N^2..N^3 per block, so longer crops recompute and fit), and statistics only beyond. On CPU it
# saves statistics only: there the 48-block LoRA step at N=64 with dots_saveable was 5-12 % faster
# than with nothing_saveable (5.6-6.4 s vs 5.9-7.3 s, steps reusing their buffers, measured before
# the statistics) but holds 3.9x the memory (5.1 vs 1.3 GiB, more than OpenFold's 4 GiB;
# scripts/bench_train_step.py --policy). Without
# `synchronous_cpu_dispatch` (training.memory) XLA:CPU also maps those temporaries afresh each
# step, which a VM handing freed pages back to its host refaults: a step after a 20 s pause took
# 22-28 s instead of 12-14 s (measured in one process, issue 11's closing note).
AUTO_DOTS_MAX_N = 64
# the statistics, named where `model/primitives.py` computes them; small next to the block input
# a rematerialised block keeps anyway (N_res^2 * C_z floats of pair):
# - the pair transition's ReLU mask, packed to bits (`relu_keeping_mask`; N_res^2 * 4 * C_z / 8
#   bytes a block), so the backward does not recompute the transition's first matmul (about a tenth
#   of an Evoformer block's forward FLOPs at N=64) only to find which entries its ReLU zeroed;
# - each LayerNorm's mean and 1 / std (`layer_norm`; 8 bytes a position), so the recompute
#   standardises without the two reductions over the channels.
# Together 0.5 MiB an Evoformer block at N=64 (single sequence), 18 MiB at N=384 (+25 % of the
# fp32 block input, +50 % of the bf16 one); 'nothing_saveable' keeps none of them.
RELU_MASK = "relu_mask"
LAYER_NORM_STATISTICS = "layer_norm_statistics"


def _base() -> mlc.ConfigDict:
    """OpenFold's default (`model_1`-like) model config, widths at full size."""
    c_z, c_m, c_t, c_e, c_s = 128, 256, 64, 64, 384
    eps = 1e-8
    return mlc.ConfigDict({
        "globals": {
            "chunk_size": None,  # attention chunking over batch-like axes (memory); None = off
            "c_z": c_z, "c_m": c_m, "c_t": c_t, "c_e": c_e, "c_s": c_s,
            "eps": eps,
            "num_recycles": 3,  # OpenFold data.common.max_recycling_iters
            "dtype": "float32",  # compute dtype: float32 | bfloat16
            "remat": False,  # nn.remat each scanned block (True when training)
            "remat_policy": "nothing_saveable",  # one of REMAT_POLICIES
        },
        "model": {
            "_mask_trans": False,
            "input_embedder": {"tf_dim": 22, "msa_dim": 49, "c_z": c_z, "c_m": c_m, "relpos_k": 32},
            "recycling_embedder": {"c_z": c_z, "c_m": c_m, "min_bin": 3.25, "max_bin": 20.75,
                                   "no_bins": 15, "inf": 1e8},
            "template": {
                "distogram": {"min_bin": 3.25, "max_bin": 50.75, "no_bins": 39},
                "template_angle_embedder": {"c_in": 57, "c_out": c_m},
                "template_pair_embedder": {"c_in": 88, "c_out": c_t},
                "template_pair_stack": {"c_t": c_t, "c_hidden_tri_att": 16, "c_hidden_tri_mul": 64,
                                        "no_blocks": 2, "no_heads": 4, "pair_transition_n": 2,
                                        "dropout_rate": 0.25, "inf": 1e9},
                "template_pointwise_attention": {"c_t": c_t, "c_z": c_z, "c_hidden": 16,
                                                 "no_heads": 4, "inf": 1e5},
                "inf": 1e5,
                "eps": eps,
                "enabled": True,
                "embed_angles": True,
                "use_unit_vector": False,
            },
            "extra_msa": {
                "extra_msa_embedder": {"c_in": 25, "c_out": c_e},
                "extra_msa_stack": {"c_m": c_e, "c_z": c_z, "c_hidden_msa_att": 8, "c_hidden_opm": 32,
                                    "c_hidden_mul": 128, "c_hidden_pair_att": 32, "no_heads_msa": 8,
                                    "no_heads_pair": 4, "no_blocks": 4, "transition_n": 4,
                                    "msa_dropout": 0.15, "pair_dropout": 0.25, "inf": 1e9,
                                    "eps": eps},
                "enabled": True,
            },
            "evoformer_stack": {"c_m": c_m, "c_z": c_z, "c_hidden_msa_att": 32, "c_hidden_opm": 32,
                                "c_hidden_mul": 128, "c_hidden_pair_att": 32, "c_s": c_s,
                                "no_heads_msa": 8, "no_heads_pair": 4, "no_blocks": 48,
                                "transition_n": 4, "msa_dropout": 0.15, "pair_dropout": 0.25,
                                "inf": 1e9, "eps": eps},
            "structure_module": {"c_s": c_s, "c_z": c_z, "c_ipa": 16, "c_resnet": 128,
                                 "no_heads_ipa": 12, "no_qk_points": 4, "no_v_points": 8,
                                 "dropout_rate": 0.1, "no_blocks": 8, "no_transition_layers": 1,
                                 "no_resnet_blocks": 2, "no_angles": 7, "trans_scale_factor": 10,
                                 "epsilon": eps, "inf": 1e5},
            "heads": {
                "lddt": {"no_bins": 50, "c_in": c_s, "c_hidden": 128},
                "distogram": {"c_z": c_z, "no_bins": 64},
                "tm": {"c_z": c_z, "no_bins": 64, "enabled": False},
                "masked_msa": {"c_m": c_m, "c_out": 23},
                "experimentally_resolved": {"c_s": c_s, "c_out": 37},
            },
        },
    })


def _set_inf(c: mlc.ConfigDict, inf: float) -> None:
    for k, v in c.items():
        if isinstance(v, mlc.ConfigDict):
            _set_inf(v, inf)
        elif k == "inf":
            c[k] = inf


def _set_widths(c: mlc.ConfigDict, **widths: int) -> None:
    """Set every field named like a width (`c_z`, `c_m`, ...) to a new value, as OpenFold's
    FieldReferences do; `c_m` of the extra-MSA stack is `c_e`."""
    def visit(node: mlc.ConfigDict, path: str) -> None:
        for k, v in node.items():
            if isinstance(v, mlc.ConfigDict):
                visit(v, f"{path}.{k}")
            elif k in widths:
                node[k] = widths["c_e"] if (k == "c_m" and path.endswith("extra_msa_stack")) else widths[k]
    visit(c, "")
    m = c.model
    m.template.template_angle_embedder.c_out = widths["c_m"]
    m.template.template_pair_embedder.c_out = widths["c_t"]
    m.extra_msa.extra_msa_embedder.c_out = widths["c_e"]
    m.heads.lddt.c_in = widths["c_s"]


def model_config(name: str, train: bool = False, low_prec: bool = False) -> mlc.ConfigDict:
    """A model config for an OpenFold preset (`model_1`..`model_5`, `model_X_ptm`) or `tiny`.

    `tiny` is `model_1_ptm` with 2 Evoformer blocks, 1 extra-MSA block, 1 template block and
    small widths: the same code, for tests and quick runs.
    """
    if name != TINY and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS + (TINY,))}")
    c = _base()
    base = "model_1_ptm" if name == TINY else name
    idx = int(base.split("_")[1])
    c.model.template.enabled = idx in (1, 2)  # AF2 Suppl. Table 5: models 1-2 use templates
    c.model.heads.tm.enabled = base.endswith("_ptm")
    if name == TINY:
        _set_widths(c, c_z=16, c_m=32, c_t=8, c_e=8, c_s=32)
        m = c.model
        m.evoformer_stack.update(no_blocks=2, c_hidden_msa_att=8, c_hidden_opm=4, c_hidden_mul=16,
                                 c_hidden_pair_att=8, no_heads_msa=2, no_heads_pair=2)
        m.extra_msa.extra_msa_stack.update(no_blocks=1, c_hidden_msa_att=4, c_hidden_opm=4,
                                           c_hidden_mul=16, c_hidden_pair_att=8, no_heads_msa=2,
                                           no_heads_pair=2)
        m.template.template_pair_stack.update(no_blocks=1, c_hidden_tri_att=4, c_hidden_tri_mul=8,
                                              no_heads=2)
        m.template.template_pointwise_attention.update(c_hidden=4, no_heads=2)
        m.structure_module.update(c_ipa=8, c_resnet=16, no_heads_ipa=2, no_qk_points=2,
                                  no_v_points=2, no_blocks=2)
        m.heads.lddt.c_hidden = 16
        c.globals.num_recycles = 1
    if train:
        c.globals.remat = True
        c.globals.remat_policy = "auto"
    if low_prec:  # OpenFold's `eps` FieldReference feeds every eps below
        m = c.model
        c.globals.eps = m.template.eps = m.evoformer_stack.eps = m.extra_msa.extra_msa_stack.eps = 1e-4
        m.structure_module.epsilon = 1e-4
        _set_inf(c, 1e4)
    return c


def remat_policy(globals_: Any) -> Any:
    """The `jax.checkpoint_policies` function for `globals_.remat_policy` (default: save nothing;
    'statistics_saveable' and an unresolved 'auto' save the statistics, see
    `resolve_remat_policy`); the dots policies save the statistics too."""
    name = globals_.get("remat_policy", "nothing_saveable")
    if name not in REMAT_POLICIES:
        raise ValueError(f"globals.remat_policy={name!r}; choose one of {REMAT_POLICIES}")
    policies = jax.checkpoint_policies
    statistics = policies.save_only_these_names(RELU_MASK, LAYER_NORM_STATISTICS)
    if name == "nothing_saveable":
        return policies.nothing_saveable
    if name in ("statistics_saveable", "auto"):
        return statistics
    return policies.save_from_both_policies(getattr(policies, name), statistics)


def with_remat(c: mlc.ConfigDict, choice: str) -> mlc.ConfigDict:
    """A copy of `c` whose scanned blocks train with `choice`, one of REMAT_CHOICES: a remat policy
    (each block rematerialised, keeping what the policy saves) or REMAT_OFF (none is)."""
    if choice not in REMAT_CHOICES:
        raise ValueError(f"remat policy {choice!r}; choose one of {REMAT_CHOICES}")
    c = copy.deepcopy(c)
    c.globals.remat = choice != REMAT_OFF
    if c.globals.remat:
        c.globals.remat_policy = choice
    return c


def remat_choice(c: mlc.ConfigDict) -> str:
    """The REMAT_CHOICES entry `c` trains with: its remat policy, or REMAT_OFF (`with_remat`'s inverse)."""
    return c.globals.remat_policy if c.globals.remat else REMAT_OFF


def resolve_remat_policy(c: mlc.ConfigDict, n_res: int, platform: str) -> mlc.ConfigDict:
    """`c`, or a copy whose remat_policy 'auto' is made concrete for a crop of `n_res` residues on
    `platform` ('cpu', 'gpu', 'tpu', as `jax.default_backend()`): 'dots_saveable' up to
    AUTO_DOTS_MAX_N residues on an accelerator, else 'statistics_saveable'."""
    if c.globals.get("remat_policy") != "auto":
        return c
    c = copy.deepcopy(c)
    dots = platform != "cpu" and n_res <= AUTO_DOTS_MAX_N
    c.globals.remat_policy = "dots_saveable" if dots else "statistics_saveable"
    return c


def from_openfold(cfg: Any) -> mlc.ConfigDict:
    """Our config from an OpenFold `model_config(...)` ConfigDict (same key names)."""
    c = _base()
    c.model.update(copy.deepcopy(cfg.model.to_dict()) if hasattr(cfg.model, "to_dict") else cfg.model)
    for k in ("chunk_size", "eps", "c_z", "c_m", "c_t", "c_e", "c_s"):
        c.globals[k] = cfg.globals[k]
    c.globals.chunk_size = None if cfg.globals.chunk_size is None else int(cfg.globals.chunk_size)
    c.globals.num_recycles = int(cfg.data.common.max_recycling_iters) if "data" in cfg else 3
    c.globals.remat = cfg.globals.blocks_per_ckpt is not None
    _prune(c.model, _base().model)
    return c


def _prune(c: mlc.ConfigDict, ref: mlc.ConfigDict) -> None:
    """Drop OpenFold's runtime-only keys (offloading, chunk tuning, ...) we have no use for."""
    for k in list(c.keys()):
        if k not in ref:
            del c[k]
        elif isinstance(c[k], mlc.ConfigDict):
            _prune(c[k], ref[k])


def config_to_dict(c: mlc.ConfigDict) -> dict:
    """JSON-able dict (for meta.json)."""
    return c.to_dict()


def config_from_dict(d: dict) -> mlc.ConfigDict:
    return mlc.ConfigDict(d)

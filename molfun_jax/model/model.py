"""The AlphaFold2 model [Algorithm 2]: embeddings, templates, extra MSA, Evoformer, structure
module and heads, with recycling. Mirrors OpenFold v1.0 `openfold/model/model.py`.

`AlphaFold(config).apply({'params': p}, feats)` takes ONE example (OpenFold feature names, no
recycling axis; batch with `jax.vmap`). The same features are used in every recycling iteration.
Recycling iterations before the last run under `nn.scan` (compiled once, whatever the count) and
their outputs are `stop_gradient`ed, as OpenFold runs them without grad.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from molfun_jax.feature_schema import (C_MSA, C_TF, FEATURE_SCHEMA, N_EXTRA, N_RES, N_SEQ, N_TEMPL,
                                       FeatureSchema)
from molfun_jax.model.embedders import (ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder,
                                        TemplateAngleEmbedder, TemplatePairEmbedder)
from molfun_jax.model.evoformer import EvoformerStack, ExtraMSAStack
from molfun_jax.model.heads import AuxiliaryHeads
from molfun_jax.config import remat_policy
from molfun_jax.model.primitives import compute_dtype
from molfun_jax.model.structure_module import StructureModule
from molfun_jax.model.template import TemplatePairStack, TemplatePointwiseAttention
from molfun_jax.np import residue_constants as rc
from molfun_jax.utils.feats import atom14_to_atom37
from molfun_jax.utils.template_feats import (build_extra_msa_feat, build_template_angle_feat,
                                             build_template_pair_feat, pseudo_beta_fn)

Array = jax.Array
Feats = Mapping[str, Array]


def _kw(c: mlc.ConfigDict) -> dict[str, Any]:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


class AlphaFold(nn.Module):
    """AlphaFold2 monomer [Algorithm 2]; submodule names are OpenFold's state-dict prefixes."""
    config: mlc.ConfigDict

    def setup(self) -> None:
        g, c = self.config.globals, self.config.model
        dt = compute_dtype(g.dtype)
        remat = {"remat": g.remat, "remat_policy": remat_policy(g)}
        self.input_embedder = InputEmbedder(**_kw(c.input_embedder), dtype=dt)
        self.recycling_embedder = RecyclingEmbedder(**_kw(c.recycling_embedder), dtype=dt)
        t = c.template
        if t.enabled:
            self.template_angle_embedder = TemplateAngleEmbedder(**_kw(t.template_angle_embedder), dtype=dt)
            self.template_pair_embedder = TemplatePairEmbedder(**_kw(t.template_pair_embedder), dtype=dt)
            self.template_pair_stack = TemplatePairStack(**_kw(t.template_pair_stack), dtype=dt, **remat)
            self.template_pointwise_att = TemplatePointwiseAttention(
                **_kw(t.template_pointwise_attention), dtype=dt)
        if c.extra_msa.enabled:
            self.extra_msa_embedder = ExtraMSAEmbedder(**_kw(c.extra_msa.extra_msa_embedder), dtype=dt)
            self.extra_msa_stack = ExtraMSAStack(**_kw(c.extra_msa.extra_msa_stack), dtype=dt, **remat)
        self.evoformer = EvoformerStack(**_kw(c.evoformer_stack), dtype=dt, **remat)
        self.structure_module = StructureModule(**_kw(c.structure_module), dtype=dt)
        self.aux_heads = AuxiliaryHeads(c.heads, dtype=dt)

    def embed_templates(self, feats: Feats, z: Array, pair_mask: Array, deterministic: bool) -> dict:
        """Template pair stack + pointwise attention [Algorithms 16, 17] and angle embedding."""
        tc = self.config.model.template
        # [T, N, N, C_t_in]: one pair feature per template (OpenFold loops; we vectorise)
        t = jax.vmap(lambda tf: build_template_pair_feat(
            tf, use_unit_vector=tc.use_unit_vector, inf=tc.inf, eps=tc.eps, **_kw(tc.distogram)))(
            {k: v for k, v in feats.items() if k.startswith("template_")})
        t = self.template_pair_embedder(t)
        t = self.template_pair_stack(t, pair_mask[None], chunk_size=self.config.globals.chunk_size,
                                     deterministic=deterministic)
        template_mask = feats["template_mask"].astype(jnp.float32)
        t = self.template_pointwise_att(t, z, template_mask=template_mask,
                                        chunk_size=self.config.globals.chunk_size)
        # [N, N, C_z]: no template at all contributes nothing
        t = t * (jnp.sum(template_mask) > 0)
        out = {"template_pair_embedding": t}
        if tc.embed_angles:
            out["template_angle_embedding"] = self.template_angle_embedder(build_template_angle_feat(feats))
        return out

    def iteration(self, feats: Feats, prevs: tuple[Array, Array, Array], deterministic: bool,
                  frozen_blocks: int = 0) -> tuple[dict, tuple]:
        """One recycling iteration; returns (outputs, (m_1_prev, z_prev, x_prev))."""
        g, c = self.config.globals, self.config.model
        n_seq = feats["msa_feat"].shape[-3]
        seq_mask = feats["seq_mask"].astype(jnp.float32)
        pair_mask = seq_mask[:, None] * seq_mask[None, :]  # [N, N]
        msa_mask = feats["msa_mask"].astype(jnp.float32)

        # [S, N, C_m], [N, N, C_z]
        m, z = self.input_embedder(feats["target_feat"], feats["residue_index"], feats["msa_feat"])
        m_1_prev, z_prev, x_prev = prevs
        x_prev = pseudo_beta_fn(feats["aatype"], x_prev, None)
        m_1_prev_emb, z_prev_emb = self.recycling_embedder(m_1_prev, z_prev, x_prev)
        m = m.at[0].add(m_1_prev_emb.astype(m.dtype))
        z = z + z_prev_emb.astype(z.dtype)

        if c.template.enabled:
            templ = self.embed_templates(feats, z, pair_mask, deterministic)
            z = z + templ["template_pair_embedding"].astype(z.dtype)
            if "template_angle_embedding" in templ:
                m = jnp.concatenate([m, templ["template_angle_embedding"].astype(m.dtype)], axis=-3)
                msa_mask = jnp.concatenate(
                    [msa_mask, feats["template_torsion_angles_mask"][..., 2].astype(jnp.float32)], axis=-2)

        if c.extra_msa.enabled:
            a = self.extra_msa_embedder(build_extra_msa_feat(feats))
            z = self.extra_msa_stack(a, z, msa_mask=feats["extra_msa_mask"].astype(jnp.float32),
                                     pair_mask=pair_mask, chunk_size=g.chunk_size, deterministic=deterministic)

        m, z, s = self.evoformer(m, z, msa_mask=msa_mask, pair_mask=pair_mask, chunk_size=g.chunk_size,
                                 deterministic=deterministic, frozen_blocks=frozen_blocks)
        outputs = {"msa": m[..., :n_seq, :, :], "pair": z, "single": s}
        outputs["sm"] = self.structure_module(s, z, feats["aatype"], seq_mask, deterministic=deterministic)
        outputs["final_atom_positions"] = atom14_to_atom37(outputs["sm"]["positions"][-1], feats)
        outputs["final_atom_mask"] = feats["atom37_atom_exists"]
        outputs["final_affine_tensor"] = outputs["sm"]["frames"][-1]
        return outputs, (m[..., 0, :, :], z, outputs["final_atom_positions"])

    def __call__(self, feats: Feats, deterministic: bool = True, frozen_blocks: int = 0) -> dict:
        """`frozen_blocks=k`: no gradient through the first k Evoformer blocks (see
        `EvoformerStack.run_blocks`); the outputs are unchanged."""
        c = self.config.model
        n = feats["aatype"].shape[-1]
        prevs = (jnp.zeros((n, c.input_embedder.c_m), jnp.float32),
                 jnp.zeros((n, n, c.input_embedder.c_z), jnp.float32),
                 jnp.zeros((n, rc.atom_type_num, 3), jnp.float32))
        num_recycles = self.config.globals.num_recycles
        if num_recycles > 0:
            def body(mdl: "AlphaFold", carry: tuple, _: None) -> tuple[tuple, None]:
                _, new = mdl.iteration(feats, carry, deterministic)
                return tuple(x.astype(jnp.float32) for x in new), None

            # params shared by all iterations (broadcast); fresh dropout masks per iteration
            recycle = nn.scan(body, variable_broadcast=["params", "lora"], variable_axes={},
                              split_rngs={"params": False, "dropout": True}, length=num_recycles)
            if self.is_initializing():  # create the params once, outside the loop
                self.iteration(feats, prevs, deterministic)
            prevs, _ = recycle(self, prevs, None)
            prevs = jax.lax.stop_gradient(prevs)
        outputs, _ = self.iteration(feats, prevs, deterministic, frozen_blocks)
        outputs.update(self.aux_heads(outputs))
        return outputs


def dummy_features(config: mlc.ConfigDict, n_res: int, n_seq: int = 1, n_extra: int = 1, n_templ: int = 1,
                   schema: FeatureSchema = FEATURE_SCHEMA) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/dtypes of one example's model inputs in `schema` (for `jax.eval_shape` of init,
    or zeros); channel widths from the config's input embedder."""
    e = config.model.input_embedder
    sizes = {N_RES: n_res, N_SEQ: n_seq, N_EXTRA: n_extra, N_TEMPL: n_templ, C_TF: e.tf_dim, C_MSA: e.msa_dim}
    return {k: jax.ShapeDtypeStruct(schema.shape(k, sizes), schema.spec(k).dtype) for k in schema.model_inputs}


def param_shapes(config: mlc.ConfigDict) -> dict:
    """The model's param tree as ShapeDtypeStructs (no computation)."""
    feats = dummy_features(config, n_res=4)
    return jax.eval_shape(lambda f: AlphaFold(config).init(jax.random.PRNGKey(0), f), feats)["params"]

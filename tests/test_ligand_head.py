"""Ligand-aware affinity head: parameter count, invariances on a real fixture complex, and the
decisive test (both heads side by side on ligands that differ in chemistry only)."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rdkit import Chem
from rdkit.Chem import Crippen
from scipy.spatial.transform import Rotation

from molfun_jax.data.buckets import crop_indices
from molfun_jax.data.features import ligand_distance
from molfun_jax.data.ligand import (ATOM_FEATURE_DIM, BOND_FEATURE_DIM, Ligand, ligand_features, ligand_pocket_mask,
                                    read_ligand)
from molfun_jax.data.parsing import parse_structure
from molfun_jax.heads import LIGAND_HEAD_INPUT_KEYS, AffinityHead, HeadConfig, LigandAffinityHead, LigandHeadConfig

PDBBIND = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "pdbbind"
pytestmark = pytest.mark.skipif(not PDBBIND.is_dir(), reason="PDBbind fixtures not found")
C_S = 32
SMALL = LigandHeadConfig(c_atom=16, n_mp_layers=2, n_heads=2, c_hidden=8, n_rbf=8, hidden_dim=16, dropout=0.0)


@functools.lru_cache(maxsize=None)
def _protein(pdb_id: str) -> dict:
    return parse_structure(PDBBIND / pdb_id / f"{pdb_id}_protein.pdb")


def _example(pdb_id: str, ligand: Ligand = None, n_atoms: int = None, n_res: int = None, seed: int = 0) -> dict:
    """Head inputs of a fixture complex: atom37 positions of the protein, the ligand's features,
    the pocket mask from the ligand file, a fixed random single representation; optionally
    cropped / padded to `n_res` residues (padding rows of `single` random, not zero)."""
    parsed = _protein(pdb_id)
    lig = ligand or read_ligand(PDBBIND / pdb_id / f"{pdb_id}_ligand.sdf")
    pos, mask = parsed["atom_positions"], parsed["atom_mask"]
    n = len(pos)
    if n_res is not None and n_res < n:
        idx = crop_indices(n, n_res, "spatial", ligand_distance({**parsed, "ligand_positions": lig.positions}))
        pos, mask, n = pos[idx], mask[idx], n_res
    rng = np.random.default_rng(seed)
    size = n if n_res is None else n_res
    pad = size - n
    ex = {"single": rng.normal(size=(size, C_S)).astype(np.float32),
          "seq_mask": np.r_[np.ones(n), np.zeros(pad)].astype(np.float32),
          "pocket_mask": np.pad(ligand_pocket_mask(pos, mask, lig.positions), (0, pad)),
          "all_atom_positions": np.pad(pos, ((0, pad), (0, 0), (0, 0))),
          "all_atom_mask": np.pad(mask, ((0, pad), (0, 0)))}
    ex.update({k: v for k, v in ligand_features(lig, n_atoms=n_atoms).items() if k != "ligand_bond_orders_known"})
    return ex


@functools.partial(jax.jit, static_argnums=0)
def _apply(head, params, ex):
    return head.apply(params, ex["single"], ex["seq_mask"], ex["pocket_mask"],
                      **{k: ex[k] for k in LIGAND_HEAD_INPUT_KEYS})


@pytest.fixture(scope="module")
def head_4x6p():
    head = LigandAffinityHead(SMALL)
    ex = _example("4x6p")

    @jax.jit
    def init(key):
        params = head.init(key, ex["single"], ex["seq_mask"], ex["pocket_mask"],
                           **{k: v for k, v in ex.items() if k not in ("single", "seq_mask", "pocket_mask")})
        # non-zero biases / norms too, so that padding would show if it leaked
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        return jax.tree_util.tree_unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                                   for x, k in zip(leaves, keys)])

    return head, init(jax.random.PRNGKey(0)), ex


def _close(a, b, rtol=1e-5):
    a, b = float(a), float(b)
    assert abs(a - b) <= rtol * max(abs(a), abs(b), 1e-3), (a, b)


def test_param_count_by_hand():
    F, B, c, H, h, R, L, D, cs = ATOM_FEATURE_DIM, BOND_FEATURE_DIM, 16, 2, 8, 8, 2, 16, C_S
    assert (F, B) == (45, 7)
    by_hand = ((F * c + c) + L * (2 * c * c + B * c + 4 * c) + 2 * cs + (2 * R * H + H) + c * H * h
               + 2 * cs * H * h + (H * h * c + c) + 2 * c + (cs * c + c) + (2 * c * D + D) + (D + 1))
    head = LigandAffinityHead(SMALL)
    ex = {"all_atom_positions": jnp.zeros((5, 37, 3)), "all_atom_mask": jnp.ones((5, 37)),
          "ligand_atom_feat": jnp.zeros((4, F)), "ligand_bond_feat": jnp.zeros((4, 4, B)),
          "ligand_positions": jnp.zeros((4, 3)), "ligand_mask": jnp.ones(4)}
    params = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((5, cs)), jnp.ones(5), None, **ex))
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == by_hand
    # the docstring's figure at the defaults and c_s = 384: the same formula
    F, B, c, H, h, R, L, D, cs = 45, 7, 64, 4, 32, 16, 3, 128, 384
    assert ((F * c + c) + L * (2 * c * c + B * c + 4 * c) + 2 * cs + (2 * R * H + H) + c * H * h + 2 * cs * H * h
            + (H * h * c + c) + 2 * c + (cs * c + c) + (2 * c * D + D) + (D + 1)) == 186_693


def test_rotation_translation_invariance(head_4x6p):
    head, params, ex = head_4x6p
    rot = Rotation.random(random_state=0).as_matrix().astype(np.float32)
    t = np.asarray([12.0, -30.0, 7.5], np.float32)
    moved = dict(ex, all_atom_positions=(ex["all_atom_positions"] @ rot.T + t) * ex["all_atom_mask"][..., None],
                 ligand_positions=(ex["ligand_positions"] @ rot.T + t) * ex["ligand_mask"][:, None])
    _close(_apply(head, params, ex), _apply(head, params, moved))


def test_ligand_atom_permutation_invariance(head_4x6p):
    head, params, ex = head_4x6p
    n = int(ex["ligand_mask"].sum())
    perm = np.r_[np.random.default_rng(0).permutation(n), np.arange(n, len(ex["ligand_mask"]))]
    permuted = dict(ex, ligand_atom_feat=ex["ligand_atom_feat"][perm], ligand_positions=ex["ligand_positions"][perm],
                    ligand_mask=ex["ligand_mask"][perm], ligand_bond_feat=ex["ligand_bond_feat"][perm][:, perm])
    _close(_apply(head, params, ex), _apply(head, params, permuted))


def test_padding_atoms_and_residues_have_no_effect(head_4x6p):
    head, params, ex = head_4x6p
    ref = _apply(head, params, ex)
    assert ex["ligand_mask"].shape == (64,)
    _close(ref, _apply(head, params, _example("4x6p", n_atoms=128)))  # a larger atom bucket
    n = len(ex["seq_mask"])
    padded = _example("4x6p", n_res=n + 84)  # a larger residue bucket: random `single` rows in the padding
    np.testing.assert_array_equal(padded["single"][:n], ex["single"])
    assert padded["single"][n:].std() > 0.5
    _close(ref, _apply(head, params, padded))


def test_ligand_chemistry_changes_prediction(head_4x6p):
    head, params, ex = head_4x6p
    lig = read_ligand(PDBBIND / "4x6p" / "4x6p_ligand.sdf")
    other = _example("4x6p", ligand=_variants(lig, 2)[1])
    np.testing.assert_array_equal(other["ligand_positions"], ex["ligand_positions"])
    assert abs(float(_apply(head, params, ex)) - float(_apply(head, params, other))) > 1e-4


# ---------------------------------------------------------------------------- decisive test
def _edits(mol: Chem.Mol) -> list[Chem.Mol]:
    """Valence-keeping single-atom edits, coordinates untouched: hydroxyl / terminal O -> F,
    aromatic N <-> aromatic CH, chain CH_n (n >= 1) -> N."""
    out = []
    for atom in mol.GetAtoms():
        sym, hs, arom, ring = atom.GetSymbol(), atom.GetTotalNumHs(), atom.GetIsAromatic(), atom.IsInRing()
        if sym == "O" and atom.GetDegree() == 1 and hs == 1:
            new = 9
        elif arom and sym == "N" and hs == 0 and atom.GetDegree() == 2:
            new = 6
        elif arom and sym == "C" and hs == 1:
            new = 7
        elif sym == "C" and not ring and hs >= 1 and atom.GetDegree() <= 3 and not atom.GetIsAromatic():
            new = 7
        else:
            continue
        rw = Chem.RWMol(mol)
        a = rw.GetAtomWithIdx(atom.GetIdx())
        a.SetAtomicNum(new)
        a.SetNumExplicitHs(0)
        a.SetNoImplicit(False)
        try:
            Chem.SanitizeMol(rw)
        except Exception:  # RDKit refuses the edit (valence / kekulisation): skip it
            continue
        out.append(rw.GetMol())
    return out


def _variants(lig: Ligand, n: int) -> list[Ligand]:
    """The ligand and up to n - 1 edited copies (distinct SMILES, same heavy-atom coordinates)."""
    seen, out = {Chem.MolToSmiles(lig.mol)}, [lig]
    for m in _edits(lig.mol):
        smi = Chem.MolToSmiles(m)
        if smi not in seen and len(out) < n:
            seen.add(smi)
            out.append(Ligand(m, lig.path, "edit"))
    return out


def _train(loss_fn, params, batch, steps: int = 200, lr: float = 5e-3):
    """Full-batch Adam on `loss_fn(params, batch)`; (params, final loss). The batch is an
    argument of the jitted step, not a constant XLA would fold at compile time."""
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    for _ in range(steps):
        params, opt, loss = step(params, opt, batch)
    return params, float(jax.jit(loss_fn)(params, batch))


def test_decisive_ligand_head_fits_ligand_chemistry_pocket_head_cannot(capsys):
    """Per complex, ligands with the same heavy-atom coordinates and different chemistry; the
    target is Crippen logP, centred within each complex and scaled by its std, so the variance
    baseline (predicting each complex's mean) has MSE 1. The protein-only head sees identical
    inputs within a complex: it cannot beat the baseline. The ligand head must."""
    complexes = ("4x6p", "1y6r", "4qf8")
    examples, targets, groups = [], [], []
    for g, pdb_id in enumerate(complexes):
        lig = read_ligand(PDBBIND / pdb_id / f"{pdb_id}_ligand.sdf")
        variants = _variants(lig, 8)
        assert len(variants) >= 4, pdb_id
        for v in variants:
            # one bucket for all: the 32 residues nearest the ligand, 64 atoms
            examples.append(_example(pdb_id, ligand=v, n_atoms=64, n_res=32, seed=g))
            targets.append(Crippen.MolLogP(v.mol))
            groups.append(g)
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    t, groups = np.asarray(targets), np.asarray(groups)
    t = t - np.asarray([t[groups == g].mean() for g in groups])
    y = jnp.asarray(t / t.std(), jnp.float32)
    baseline = float(jnp.mean(jnp.square(y)))  # = 1: every complex's mean predicted
    batch["y"] = y
    # the protein side is the same within a complex
    for g in range(len(complexes)):
        rows = np.flatnonzero(groups == g)
        assert np.all(np.asarray(batch["single"])[rows] == np.asarray(batch["single"])[rows[0]])

    pocket = AffinityHead(HeadConfig(hidden_dim=32, dropout=0.0))
    p_pocket = jax.jit(pocket.init)(jax.random.PRNGKey(0), batch["single"], batch["seq_mask"], batch["pocket_mask"])

    def pocket_pred(p, b):
        return pocket.apply(p, b["single"], b["seq_mask"], b["pocket_mask"])

    p_pocket, loss_pocket = _train(lambda p, b: jnp.mean(jnp.square(pocket_pred(p, b) - b["y"])), p_pocket, batch)

    lig_head = LigandAffinityHead(SMALL)
    lig_keys = LIGAND_HEAD_INPUT_KEYS

    def lig_pred(p, b):
        return lig_head.apply(p, b["single"], b["seq_mask"], b["pocket_mask"], **{k: b[k] for k in lig_keys})

    p_lig = jax.jit(lambda key: lig_head.init(key, batch["single"], batch["seq_mask"], batch["pocket_mask"],
                                              **{k: batch[k] for k in lig_keys}))(jax.random.PRNGKey(0))
    p_lig, loss_lig = _train(lambda p, b: jnp.mean(jnp.square(lig_pred(p, b) - b["y"])), p_lig, batch)

    with capsys.disabled():
        print(f"\ndecisive test ({len(y)} ligands, {len(complexes)} complexes, Crippen logP within complex): "
              f"baseline {baseline:.3f}, pocket head {loss_pocket:.3f}, ligand head {loss_lig:.4f}")
    assert loss_pocket > 0.5 * baseline
    assert loss_lig < 0.1 * baseline
    # a change of chemistry alone (same complex, same pose) changes the trained ligand model's
    # prediction, and the pocket model's not at all
    rows = np.flatnonzero(groups == 0)
    i, j = rows[np.argmin(t[rows])], rows[np.argmax(t[rows])]
    pl, pp = np.asarray(jax.jit(lig_pred)(p_lig, batch)), np.asarray(jax.jit(pocket_pred)(p_pocket, batch))
    assert pl[j] - pl[i] > 0.5 * float(y[j] - y[i])
    np.testing.assert_allclose(pp[i], pp[j], rtol=1e-6)

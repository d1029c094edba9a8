"""Affinity head: size, masked / pocket pooling, losses, target normalisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molfun_jax.heads import AffinityHead, HeadConfig, TargetNorm, affinity_loss


def init(head, c_s=384, n=10):
    return head.init(jax.random.PRNGKey(0), jnp.zeros((n, c_s)), jnp.ones((n,)))["params"]


def test_head_size():
    params = init(AffinityHead(HeadConfig()))
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == 2 * 384 + (384 * 128 + 128) + (128 + 1) == 50_177
    assert params["linear_1"]["kernel"].shape == (384, 128) and params["linear_2"]["kernel"].shape == (128, 1)


def test_pooling():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.float32)
    seq = jnp.asarray([[1.0] * 8 + [0.0] * 2, [1.0] * 10])
    pocket = jnp.asarray([[0, 1, 1, 0, 0, 1, 0, 0, 0, 1], [0] * 10], jnp.float32)  # ex. 1: no pocket
    head = AffinityHead(HeadConfig(hidden_dim=8, dropout=0.0))
    params = init(head, 16)
    out = head.apply({"params": params}, s, seq, pocket)

    def by_hand(x, w):  # LayerNorm, weighted mean, MLP
        p = params
        xf = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
        xf = xf * p["layer_norm"]["scale"] + p["layer_norm"]["bias"]
        pooled = (xf * w[:, None]).sum(0) / w.sum()
        h = jax.nn.relu(pooled @ p["linear_1"]["kernel"] + p["linear_1"]["bias"])
        return (h @ p["linear_2"]["kernel"] + p["linear_2"]["bias"])[0]

    # ex. 0: pocket residues that are real (index 9 is padding); ex. 1: empty pocket -> all residues
    np.testing.assert_allclose(out[0], by_hand(s[0], pocket[0] * seq[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], by_hand(s[1], seq[1]), rtol=1e-5, atol=1e-6)
    mean = AffinityHead(HeadConfig(hidden_dim=8, dropout=0.0, pooling="mean")).apply({"params": params}, s, seq, pocket)
    np.testing.assert_allclose(mean[0], by_hand(s[0], seq[0]), rtol=1e-5, atol=1e-6)
    # padding residues do not matter
    s2 = s.at[0, 8:].set(100.0)
    np.testing.assert_allclose(head.apply({"params": params}, s2, seq, pocket), out, rtol=1e-6)
    # dropout: on with an RNG in training mode only
    hd = AffinityHead(HeadConfig(hidden_dim=8, dropout=0.5))
    np.testing.assert_array_equal(hd.apply({"params": params}, s, seq), hd.apply({"params": params}, s, seq))
    train = hd.apply({"params": params}, s, seq, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(train, hd.apply({"params": params}, s, seq))


def test_losses_and_normalisation():
    pred, target = jnp.asarray([0.0, 0.5, 3.0]), jnp.asarray([0.0, 0.0, 0.0])
    np.testing.assert_allclose(affinity_loss(pred, target), [0.0, 0.25, 9.0])
    np.testing.assert_allclose(affinity_loss(pred, target, "huber", 1.0), [0.0, 0.125, 2.5])
    with pytest.raises(ValueError):
        affinity_loss(pred, target, "l1")
    norm = TargetNorm.fit([4.0, 6.0, 8.0])
    assert (norm.mean, norm.std) == pytest.approx((6.0, np.std([4.0, 6.0, 8.0])))
    assert norm.denormalize(norm.normalize(7.5)) == pytest.approx(7.5)
    assert TargetNorm.fit([3.0, 3.0]).std == 1.0
    assert TargetNorm(**norm.to_dict()) == norm
    for bad in ({"pooling": "max"}, {"source": "msa"}, {"loss": "l1"}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            HeadConfig(**bad)

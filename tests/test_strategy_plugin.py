"""A new strategy is one class: defined here only, registered with `register_strategy`, it runs
through the CLI (flags, validation, description line, checkpoints) and the API."""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, Optional

import jax
import numpy as np
import pytest

from molfun_jax.training import Option, Rule, Strategy, StrategyError, register_strategy
from tests.product_data import (chain_examples, compile_cache, data_csv, fast_config, fast_weights,  # noqa: F401
                                tiny_run, tiny_weights)

PROJECTION = ("trunk", "evoformer", "linear")


@register_strategy
@dataclasses.dataclass(frozen=True, kw_only=True)
class Projection(Strategy):
    """Train the Evoformer's output projection (evoformer/linear) and the head."""
    name: ClassVar[str] = "test_projection"
    lr_field: ClassVar[str] = "lr_projection"
    structural: ClassVar[tuple[str, ...]] = ("train_bias",)
    options: ClassVar[tuple[Option, ...]] = (
        Option("head-factor", "head_factor", float, "head LR / projection LR (default 10)"),)
    lr_projection: float = 1e-3
    head_factor: float = 10.0
    train_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.head_factor > 0:
            raise StrategyError("head_factor", f"must be > 0, got {self.head_factor}")

    def describe(self) -> str:
        return f"evoformer/linear, head at {self.head_factor:g}x"

    def rule(self, path: tuple[str, ...], no_blocks: int, head_source: str) -> Optional[Rule]:
        if path[:3] == PROJECTION and (self.train_bias or path[-1] == "kernel"):
            return Rule("trunk")
        return Rule("head") if path[0] == "head" else None

    def learning_rates(self, no_blocks: int) -> dict[str, float]:
        return {"trunk": self.lr_projection, "head": self.head_factor * self.lr_projection}


def projection_size(config) -> int:
    """evoformer/linear: c_m -> c_s, kernel and bias (AF2 supplement Algorithm 6, line 11)."""
    c_m, c_s = config.model.evoformer_stack.c_m, config.model.evoformer_stack.c_s
    return c_m * c_s + c_s


@pytest.mark.slow  # ~1 min (a CLI run and a resume); the API fit of the new strategy runs by default
def test_cli_knows_the_new_strategy(tmp_path, data_csv, tiny_weights, compile_cache, capsys):
    from molfun_jax.api import MolfunStructureModel
    from molfun_jax.cli.train import parse_args
    from molfun_jax.config import model_config

    with pytest.raises(SystemExit):
        parse_args(["--data", str(data_csv), "--pdbs", str(tmp_path), "--strategy", "test_projection",
                    "--head-factor", "0", "--output", str(tmp_path / "x")])
    assert "--head-factor must be > 0, got 0.0" in capsys.readouterr().err
    out = tmp_path / "run"
    rows = tiny_run(out, data_csv, tiny_weights, "--strategy", "test_projection", "--lr", "2e-3",
                    "--head-factor", "5", "--epochs", "1")
    stdout = capsys.readouterr().out
    assert "Strategy: test_projection (evoformer/linear, head at 5x) | trainable: " in stdout
    assert "LR: 2.0e-03 (head 1.0e-02)" in stdout and len(rows) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"]["name"] == "test_projection" and report["strategy"]["head_factor"] == 5.0
    assert report["trainable"]["trunk"] == projection_size(model_config("tiny"))
    # the checkpoint loads back as the new class, and a structural difference is refused
    m = MolfunStructureModel.load(out)
    assert m.strategy == Projection(lr_projection=2e-3, head_factor=5.0, amp=False, accumulation_steps=1)
    other = MolfunStructureModel("tiny", Projection(train_bias=False), weights=tiny_weights)
    with pytest.raises(ValueError, match="train_bias"):
        other.load_checkpoint(out)


def test_api_fits_the_new_strategy(fast_weights, chain_examples, compile_cache):
    from molfun_jax.api import MolfunStructureModel

    cfg = fast_config()
    m = MolfunStructureModel("tiny", Projection(lr_projection=1e-2, amp=False), config=cfg, weights=fast_weights)
    assert m.trainable_counts() == {"trunk": projection_size(cfg), "head": m.trainable_counts()["head"],
                                    "total": projection_size(cfg) + m.trainable_counts()["head"]}
    before = m.variables["trunk"]
    m.fit(chain_examples[:4], epochs=1, batch_size=2)
    after = m.variables["trunk"]
    assert not np.array_equal(before["evoformer"]["linear"]["kernel"], after["evoformer"]["linear"]["kernel"])
    blocks = zip(jax.tree_util.tree_leaves(before["evoformer"]["blocks"]),
                 jax.tree_util.tree_leaves(after["evoformer"]["blocks"]))
    assert all(np.array_equal(a, b) for a, b in blocks)  # frozen: bit-identical

"""`train.py --config run.yaml|.json`: every flag is a key, flags override it, the run_args.json a
run writes is itself a config, an unknown key is a clear error."""
from __future__ import annotations

import json

import pytest

from tests.product_data import (CHAINS, TINY_RUN, compile_cache, data_csv, tiny_run,  # noqa: F401 (fixtures)
                                tiny_weights)


def parse(argv: list[str]):
    from molfun_jax.cli.train import parse_args
    return parse_args(argv)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


@pytest.mark.slow  # ~40 s: two CLI runs
def test_yaml_config_reproduces_the_flag_run(tmp_path, data_csv, tiny_weights, compile_cache):
    import yaml

    by_flags = tiny_run(tmp_path / "flags", data_csv, tiny_weights)
    # the same run as YAML: keys are the flags' destinations
    flags = ["--data", str(data_csv), "--pdbs", str(CHAINS), "--weights", str(tiny_weights), *TINY_RUN]
    config, i = {}, 0
    while i < len(flags):
        key = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            config[key], i = flags[i + 1], i + 2
        else:
            config[key], i = True, i + 1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    from molfun_jax.cli.train import main

    assert main(["--config", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "yaml")]) == 0
    by_yaml = (tmp_path / "yaml" / "metrics.csv").read_text().splitlines()
    import csv

    assert without_time(list(csv.DictReader(by_yaml))) == without_time(by_flags)


def test_run_args_round_trip(tmp_path, data_csv):
    from molfun_jax.cli.train import run_args, save_run_args

    a = parse(["--data", str(data_csv), "--pdbs", str(CHAINS), "--preset", "tiny", "--strategy", "partial",
               "--unfreeze-blocks", "1", "--lr", "3e-4", "--ema", "0.9", "--tracker", "tensorboard",
               "--output", str(tmp_path / "a")])
    save_run_args(a)
    b = parse(["--config", str(tmp_path / "a" / "run_args.json"), "--output", str(tmp_path / "b")])
    saved = json.loads((tmp_path / "a" / "run_args.json").read_text())
    assert {**run_args(b), "output": saved["output"]} == saved
    # the command line wins over the config
    c = parse(["--config", str(tmp_path / "a" / "run_args.json"), "--output", str(tmp_path / "c"), "--lr", "1e-2"])
    assert (c.lr, c.unfreeze_blocks, c.strategy) == (1e-2, 1, "partial")


def test_config_errors_name_the_key(tmp_path, data_csv, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {data_csv}\npdbs: {CHAINS}\nbatchsize: 4\n")
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(bad), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert f"--config {bad}: unknown key 'batchsize'" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"data": str(data_csv), "pdbs": str(CHAINS), "strategy": "adapters"}))
    with pytest.raises(SystemExit):
        parse(["--config", str(wrong), "--output", str(tmp_path / "o")])
    assert "strategy: 'adapters' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "none.yaml")])
    assert "none.yaml: no such file" in capsys.readouterr().err

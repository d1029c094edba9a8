"""CLI of the OpenFold `.pt` -> molfun_jax weights converter (the mapping itself is
`molfun_jax.openfold_weights`, re-exported here):

    python convert/torch_to_flax.py IN.pt OUT_DIR [--preset model_1_ptm]

writes a folder that `molfun_jax.pretrained.load_pretrained` reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molfun_jax.openfold_weights import (V1_TO_V2, check_tree, flax_to_torch, guess_preset,  # noqa: E402,F401
                                         is_v2_layout, key_to_path, load_torch_checkpoint, path_to_key,
                                         state_dict_to_tree, to_v1_layout, torch_to_flax, tree_to_state_dict,
                                         unwrap, v1_to_v2_key)
from molfun_jax.pretrained import convert_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert an OpenFold (v1 or v2) .pt checkpoint to molfun_jax weights.")
    ap.add_argument("input", help="OpenFold .pt file (plain state dict, EMA or Lightning checkpoint)")
    ap.add_argument("output", help="output folder (orbax params + meta.json)")
    ap.add_argument("--preset", default="model_1_ptm", help="model preset the weights belong to (default model_1_ptm)")
    args = ap.parse_args(argv)
    try:
        out = convert_file(args.input, args.output, args.preset)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

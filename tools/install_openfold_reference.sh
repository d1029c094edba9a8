#!/usr/bin/env bash
# Install the OpenFold v1.0.0 reference (PyPI openfold==0.0.1) as pure Python into the active
# Python, with a PyTorch stand-in for its CUDA softmax kernel. Test/conversion-check dependency only.
# Usage: tools/install_openfold_reference.sh [python]   (idempotent)
set -euo pipefail
PY=${1:-python}
SHA=d709aa2647b9e15fd4da42dfc3dbe9fc7310c42bc01bd0b4f5600eb39edef8f8
if "$PY" -c "import openfold, attn_core_inplace_cuda, openfold.model.model" 2>/dev/null; then
  echo "openfold reference already installed"; exit 0
fi
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
here=$(cd "$(dirname "$0")" && pwd)
# pip runs the sdist's setup.py even to download it; it imports scripts.utils.get_nvidia_cc.
mkdir -p "$work/shim/scripts"
touch "$work/shim/scripts/__init__.py"
printf 'def get_nvidia_cc():\n    return None, "cpu"\n' > "$work/shim/scripts/utils.py"
PYTHONPATH="$work/shim" "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
  openfold==0.0.1 -d "$work"
echo "$SHA  $work/openfold-0.0.1.tar.gz" | sha256sum -c -
tar xzf "$work/openfold-0.0.1.tar.gz" -C "$work"
src="$work/openfold-0.0.1"
cp "$here/openfold_reference/attn_core_inplace_cuda.py" "$src/"
cat > "$src/setup.py" <<'PYEOF'
from setuptools import setup, find_packages
setup(
    name="openfold",
    version="0.0.1",
    packages=find_packages(exclude=["tests", "scripts"]),
    py_modules=["attn_core_inplace_cuda"],
    include_package_data=True,
    package_data={"openfold": ["resources/*"]},
)
PYEOF
"$PY" -m pip install -q --no-deps --no-build-isolation "$src"
"$PY" -m pip install -q ml-collections dm-tree biopython
"$PY" -c "import openfold.model.model, attn_core_inplace_cuda; print('openfold reference installed')"

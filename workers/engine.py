"""The parse engine: schema-constrained, prefix-cached, batched greedy decoding.

How a batch is parsed:

1. Each query gets its own grammar (``workers.grammar``): the JSON object of the parse schema whose
   values are restricted by the grounding mode. xgrammar compiles it (cached by grammar text) and a
   matcher checks every output token, so every output is valid JSON of the schema.
2. The instruction + few-shot prefix is prefilled once per model load; its key/value cache is copied
   into every batch, so only ``" " + query + "\\nJSON:"`` is prefilled per row.
3. Rows are sorted by suffix length and split into groups when padding would waste too much.
4. Decoding is greedy. The model runs only where the grammar leaves a choice: text the grammar
   forces is appended without a model step, and a row whose remaining output is entirely forced
   (e.g. ``, "color": null, "style": null}`` when the query names no colour or style) finishes
   without another forward pass. With ``jump_forward`` the forced tokens before a decision go into
   the model together, as many per step as the step's width (``_step_width``) allows; without it
   they go one per step, keeping rows in step. Where a field with a ``null_bias`` begins, null's
   tokens get that bias before the choice.
5. On packed steps, each row's next choices are guessed from earlier choices at the same place of the
   output (``workers.drafting``) and fed in the same pass; the model's choice at each guessed position
   keeps the guess or replaces it and ends the chain. Same outputs, fewer passes.

One ``DecodeLoop`` runs the steps: ``parse_batch`` runs one per length group until its rows are
done; ``submit`` feeds a continuously running one (``workers.continuous``) whose rows join at the
next step and leave as they finish.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from schemas.settings import Settings
from schemas.spec import ParseSpec
from workers.drafting import DraftTable, draft_context
from workers.grammar import (
    Grounding,
    RowGrammar,
    build_row_grammar,
    load_checked_spec,
    normalize_parse,
    spec_vocabulary,
)
from workers.memory import HeapTrimmer
from workers.packed import PackedStepper
from workers.prompt import prompt_prefix, prompt_suffix

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

    from workers.continuous import ContinuousBatcher
    from workers.model import LoadedModel
    from workers.static_decode import StaticDecoder

log = structlog.get_logger(__name__)

#: Bumped when the decoding scheme changes in a way that can change outputs.
ENGINE_FORMAT = "constrained-v1"
#: Hard bound on decoding steps of one row; grammars are bounded far below it. A row still
#: unfinished then gets the all-null parse rather than invalid output.
MAX_STEPS = 512
#: Cache columns masked for every active row (their rows have left) that a dynamic batch keeps
#: before it drops them; without a bound a continuously running batch would grow without end.
COMPACT_DEAD_COLUMNS = 64
#: The fixed cost of one forward pass on CPU (weights read, per-layer overhead), in the compute of
#: that many positions: what a step saves by being narrower is weighed against an extra step.
#: Chosen by an ad-hoc sweep; ``qustream bench engine`` measures balanced against full width
#: (docs/engine.md). Other devices feed the full width:
#: there a wider step costs next to nothing until the device is saturated.
CPU_STEP_OVERHEAD_POSITIONS = 64


@dataclass
class ParseResult:
    """One query's parse as the engine produced it, before pydantic validation."""

    parse: dict[str, str | None]
    ungrounded: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0


class ParseEngine(Protocol):
    model_id: str
    grounding: str
    #: The parse spec every result follows.
    spec: ParseSpec
    #: Changes whenever model, prompt, parse spec (fields, values, examples) or grounding mode change;
    #: part of every cache key so a change never serves stale parses.
    version: str

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        """Parse normalized queries; one result per query, same order. Raises on model failure."""
        ...

    def warm_up(self) -> None:
        """Run one small batch so the first real batch does not pay one-time costs."""
        ...


def uses_few_shot(spec: ParseSpec, card: dict[str, Any] | None) -> bool:
    """Whether the prompt shows the spec's examples: yes, unless the model's card (``qustream train``)
    says it was trained for this spec without them. A model trained for another spec keeps them."""
    if card is None or card.get("few_shot", True):
        return True
    return bool((card.get("spec") or {}).get("name") != spec.name)


def warn_about_card(spec: ParseSpec, card: dict[str, Any] | None) -> None:
    """Say once, when the engine is built, that a trained model serves a spec other than its own."""
    trained_for = (card or {}).get("spec")
    if not trained_for:
        return
    if trained_for.get("name") != spec.name:
        log.warning("engine.card_spec_mismatch", trained_for=trained_for, spec=spec.name,
                    few_shot=uses_few_shot(spec, card),
                    note="the model was trained for another spec: it serves this one with the spec's examples, "
                    "as an untrained model would; train it for this spec (qustream train) or serve a model trained "
                    "for it")
    elif trained_for.get("fingerprint") != spec.fingerprint:
        log.warning("engine.card_spec_changed", trained_for=trained_for, fingerprint=spec.fingerprint,
                    version=spec.version, few_shot=uses_few_shot(spec, card),
                    note="the spec changed since the model was trained (fields, values, examples or options): "
                    "what it learned may no longer fit, and values or fields added since were never taught; "
                    "retrain it on labels for this version (qustream train) and compare with qustream eval")


def engine_version(model_id: str, spec: ParseSpec, grounding: str, card: dict[str, Any] | None = None) -> str:
    """``card`` (the model folder's ``qustream.json``) carries a digest of the trained weights, so
    retraining into the same folder changes the version too."""
    material = json.dumps(
        {
            "format": ENGINE_FORMAT,
            "model": model_id,
            "prompt": prompt_prefix(spec, uses_few_shot(spec, card)),
            "spec": spec.canonical_json(),
            "grounding": grounding,
            "card": card,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:12]


@dataclass
class _Choice:
    """A place in a row's feed where the model chooses the next token, planned before the pass."""

    #: Index in the row's feed of the token whose logits choose; -1 for the last choice: the feed's
    #: last token, however the feed is cut into steps (a guessed choice's feed goes in one step).
    at: int
    #: Output tokens written before the choice: a replaced guess rolls the output back to here.
    written: int
    context: tuple[str, bool]
    #: The grammar's mask at this place (1, vocabulary words), filled when the place was reached.
    bitmask: torch.Tensor
    #: Added to null's logits here (the field's ``null_bias``).
    null_bias: float
    #: The guessed token, already accepted into the grammar and the feed; None for a chain's last
    #: choice, unless the grammar ends with that choice's guess.
    guess: int | None = None


@dataclass
class _Row:
    index: int
    query: str
    grammar: RowGrammar
    matcher: Any
    feed: list[int]
    tokens_in: int
    out_ids: list[int] = field(default_factory=list)
    position: int = 0
    #: The position of the first token of the last chunk fed.
    fed_from: int = 0
    #: Forward passes this row has been in; its first feeds the whole prefill chunk.
    steps: int = 0
    done: bool = False
    #: The choices its feed leads to, in order; only the last one may lack a guess.
    choices: list[_Choice] = field(default_factory=list)


@dataclass
class DecodeStats:
    """Counters of the last ``parse_batch``, for benchmarks and metrics."""

    forwards: int = 0
    positions: int = 0
    padded_positions: int = 0
    decisions: int = 0
    #: Guessed choices the model judged (guesses after a replaced one are not), and those it kept.
    guessed: int = 0
    guesses_kept: int = 0
    groups: int = 0
    #: Rows that joined a batch already decoding (continuous batching).
    joined: int = 0
    seconds: float = 0.0

    def add(self, other: DecodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Stepper(Protocol):
    """Runs the model over one decoding batch; rows are the batch's active rows, in order."""

    def step(self, ids: torch.Tensor, step_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one left-padded chunk per row; returns float32 CPU logits of each row's last position."""
        ...

    def keep(self, indices: list[int]) -> None:
        """Only these rows (indices into the current active rows) go on."""
        ...

    def absorb(self, joining: Stepper) -> None:
        """Rows prefilled on a stepper of their own follow the active ones."""
        ...


class DynamicStepper:
    """DynamicCache decoding: the prefix KV is held once (``shared``, with the attention function of
    ``workers.attention``) or copied into the batch; finished rows are dropped and new rows can join
    between steps.

    All rows share one cache length L, padded through the attention mask. Joining rows are prefilled
    on a stepper of their own (so the running rows' step is not widened to the joiners' suffixes) and
    then ``absorb``ed; their positions start after the prefix as every row's do, so rotary encoding is
    the same as in a batch they had started with.
    """

    def __init__(
        self,
        model: Any,
        device: str,
        batch: int,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
        compact_dead: int = COMPACT_DEAD_COLUMNS,
        shared: bool = False,
    ) -> None:
        import torch
        from transformers import DynamicCache

        self.model = model
        self.device = device
        self.prefix = prefix
        self.compact_dead = compact_dead
        #: The prefix stays out of the cache and is passed to the attention function instead.
        self._shared: dict[str, Any] = {"shared_prefix": prefix} if shared and prefix is not None else {}
        if prefix is None or self._shared:
            self.cache = DynamicCache()
            self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)
        else:
            data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]
            self.cache = DynamicCache(ddp_cache_data=data)
            self.mask = torch.ones((batch, prefix[0][0].shape[2]), dtype=torch.long, device=device)

    def step(self, ids: torch.Tensor, step_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        import torch

        self.mask = torch.cat([self.mask, step_mask.to(self.device)], dim=1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask,
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **self._shared,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float().cpu()

    def keep(self, indices: list[int]) -> None:
        import torch

        index = torch.tensor(indices, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        # Only leaving rows turn columns dead (masked for every row left), so this is where to drop them.
        alive = self.mask.any(dim=0)
        if self.mask.shape[1] - int(alive.sum()) > self.compact_dead:
            columns = alive.nonzero().squeeze(1)
            self.mask = self.mask[:, columns]
            for layer in self._layers():
                if layer.get_seq_length() > 0:
                    layer.keys = layer.keys[:, :, columns]
                    layer.values = layer.values[:, :, columns]

    def absorb(self, joining: Stepper) -> None:
        """The joining rows' caches go below the active ones'. Columns are matched by index, so the
        shorter side is padded on the right with masked columns: attention does not depend on the
        order of cached columns, whose positions were encoded when they were computed, and every
        later token goes after all of them."""
        import torch

        if not isinstance(joining, DynamicStepper):
            raise TypeError("only rows prefilled on a dynamic cache can join one")
        length = max(self.mask.shape[1], joining.mask.shape[1])
        masks = [torch.nn.functional.pad(mask, (0, length - mask.shape[1])) for mask in (self.mask, joining.mask)]
        for mine, theirs in zip(self._layers(), joining._layers(), strict=True):
            mine.keys, mine.values = (
                torch.cat([torch.nn.functional.pad(tensor, (0, 0, 0, length - tensor.shape[2]))
                           for tensor in pair], dim=0)
                for pair in ((mine.keys, theirs.keys), (mine.values, theirs.values))
            )
        self.mask = torch.cat(masks, dim=0)

    def _layers(self) -> list[Any]:
        """The cache's layers, whose ``keys``/``values`` (batch, heads, L, dim) are swapped here."""
        return list(self.cache.layers)

    def _prefix_layer(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.prefix is None else self.prefix[index]


class ConstrainedEngine:
    """Grammar-constrained greedy parser over a loaded causal LM. One batch at a time (locked)."""

    def __init__(
        self,
        settings: Settings,
        loaded: LoadedModel,
        spec: ParseSpec,
        *,
        use_prefix_cache: bool = True,
        min_group: int = 16,
        max_pad_waste: float = 0.3,
        gqa_attention: bool | None = None,
        step_overhead_positions: int = CPU_STEP_OVERHEAD_POSITIONS,
    ) -> None:
        import xgrammar as xgr

        self.settings = settings
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.spec = spec
        self.vocabulary = spec_vocabulary(spec)
        self.model_id = loaded.model_id
        #: Where the model runs ("cpu", "cuda", "mps"): the pipeline chooses how misses reach it by it.
        self.device = loaded.device
        self.grounding: str = settings.grounding
        self._grounding: Grounding = settings.grounding
        self.jump_forward = settings.jump_forward
        self.jump_forward_width = settings.jump_forward_width
        self.use_prefix_cache = use_prefix_cache
        self.min_group = min_group
        self.max_pad_waste = max_pad_waste
        self.step_overhead_positions = step_overhead_positions
        warn_about_card(spec, loaded.card)
        self.few_shot = uses_few_shot(spec, loaded.card)
        self.version = engine_version(self.model_id, spec, self.grounding, loaded.card)
        self.last_stats = DecodeStats()
        #: ``parse_batch``'s counters summed since start (under ``_lock``), and those of continuous
        #: batchers replaced since (under ``_batcher_lock``); the running batcher keeps its own.
        self._batch_totals = DecodeStats()
        self._retired_totals = DecodeStats()
        self._lock = threading.Lock()
        self._batcher: ContinuousBatcher | None = None
        self._batcher_lock = threading.Lock()
        self._heap_trimmer = HeapTrimmer()
        self._closed = False
        self._vocab_size = int(self.model.config.vocab_size)
        self._tokenizer_info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self._vocab_size)
        self._compiler = xgr.GrammarCompiler(self._tokenizer_info, max_threads=1, cache_enabled=True)
        self._prefix_ids: list[int] = list(self.tokenizer(prompt_prefix(spec, self.few_shot))["input_ids"])
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._static: StaticDecoder | None = None
        if settings.compile and loaded.device == "cuda":
            from workers.static_decode import StaticDecoder

            self._static = StaticDecoder(self.model, loaded.device, len(self._prefix_ids), compile_model=True)
        if gqa_attention is None:
            # On CUDA, SDPA's fused kernels need the mask-free path; GQA-with-mask only pays on CPU.
            gqa_attention = loaded.device == "cpu"
        #: The prompt prefix's keys/values are held once and attended to beside each row's own cache
        #: (``workers.attention``) rather than copied into every row: needs our attention function.
        self._shared_prefix = False
        if gqa_attention:
            from workers.attention import use_gqa_sdpa

            self._shared_prefix = use_gqa_sdpa(self.model) and use_prefix_cache
        #: Packed steps (``workers.packed``) need the shared prefix's attention function.
        self.packed = self._shared_prefix and settings.decode_layout != "padded"
        #: Choices a row guesses ahead per pass (``workers.drafting``); packed steps only.
        self.guess_choices = settings.guess_choices
        self._guesses = DraftTable()
        if settings.decode_layout == "packed" and not self.packed:
            log.warning("engine.packed_unavailable", device=loaded.device,
                        reason="packed steps need the shared-prefix attention (CPU, sdpa model, prefix cache)")
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
        #: The written key that a field's value follows, and the bias its null gets there (``null_bias``).
        self._null_bias = {json.dumps(f.name) + ":": f.null_bias for f in spec.fields if f.null_bias}
        self._null_ids: list[int] = []
        if self._null_bias:
            # Every token that can begin the literal null (the grammar masks those it does not allow).
            self._null_ids = [
                i for i, text in enumerate(self._tokenizer_info.decoded_vocab)
                if (start := text.lstrip()) and (b"null".startswith(start) or start.startswith(b"null"))
            ]

    # ----------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        started = time.perf_counter()
        if self._static is not None:
            import torch

            with self._lock, torch.inference_mode():
                self._static.warm_up(self._prefix_cache(), self._pad_id)
        self.parse_batch([example.query for example in self.spec.examples[:3]] or ["warm up"])
        log.info("engine.warm", version=self.version, seconds=round(time.perf_counter() - started, 2))

    def weights_changed(self) -> None:
        """Forget the prefix's keys/values (training evaluates an engine on a model it updates)."""
        self._prefix_kv = None

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        if not queries:
            return []
        import torch

        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            self.last_stats = DecodeStats()
            rows = [self._new_row(i, q) for i, q in enumerate(queries)]
            pending = [r for r in rows if not r.done]
            for group in self._length_groups(pending):
                self._decode_group(group)
                self.last_stats.groups += 1
            results = [self._result(r) for r in rows]
            self.last_stats.seconds = time.perf_counter() - started
            self._batch_totals.add(self.last_stats)
        self.release_freed_memory()
        return results

    def decode_totals(self) -> DecodeStats:
        """Decoding counters since start, batch and continuous together (for metrics; read unlocked,
        so a figure may lag a step)."""
        totals = DecodeStats()
        totals.add(self._batch_totals)
        with self._batcher_lock:
            totals.add(self._retired_totals)
            if self._batcher is not None:
                totals.add(self._batcher.stats)
        return totals

    def release_freed_memory(self) -> None:
        """After a batch or a decoding step: the heap's free pages back to the OS, at most once a second."""
        self._heap_trimmer.maybe_trim()

    def submit(self, query: str) -> Future[ParseResult]:
        """Parse one normalized query in the continuously running batch (``workers.continuous``):
        thread-safe and quick, so an event loop may call it. Its result equals ``parse_batch``'s.
        The same query while in flight gets the same future."""
        with self._batcher_lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._batcher is None or not self._batcher.running:
                from workers.continuous import ContinuousBatcher

                if self._batcher is not None:  # its thread has stopped: its counters stay counted
                    self._retired_totals.add(self._batcher.stats)
                self._batcher = ContinuousBatcher(self, self.settings.batch_size)
            batcher = self._batcher
        return batcher.submit(query)

    def close(self) -> None:
        """Stop the continuous batcher's thread; unresolved futures fail. Idempotent."""
        with self._batcher_lock:
            self._closed = True
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def teacher_forcing(self, query: str, output: str) -> tuple[list[int], list[int]] | None:
        """The tokens this engine feeds after the prompt prefix while it writes ``output`` for ``query``
        (the row's suffix, forced text as ``_force`` encodes it, and each chosen token as the
        tokenizer splits the rest of ``output``), and the indices of the chosen ones: what training
        teaches, so training and serving cannot drift. None when the grammar cannot write ``output``."""
        row = self._new_row(0, query)
        fed = list(row.feed)
        chosen: list[int] = []
        while not row.done:
            written = self.tokenizer.decode(row.out_ids)
            if not output.startswith(written) or len(output) == len(written):
                return None
            token = self._encode(output[len(written) :])[0]
            if not row.matcher.accept_token(token):
                return None
            row.out_ids.append(token)
            chosen.append(len(fed))
            fed.append(token)
            if row.matcher.is_completed():
                break
            fed.extend(self._force(row))
        return (fed, chosen) if self.tokenizer.decode(row.out_ids) == output else None

    # ----------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _new_row(self, index: int, query: str) -> _Row:
        import xgrammar as xgr

        grammar = build_row_grammar(query, self.vocabulary, self._grounding)
        compiled = self._compiler.compile_grammar(grammar.ebnf)
        matcher = xgr.GrammarMatcher(compiled)
        suffix = self._encode(prompt_suffix(query))
        feed = suffix if self.use_prefix_cache else self._prefix_ids + suffix
        row = _Row(index, query, grammar, matcher, feed, tokens_in=len(self._prefix_ids) + len(suffix))
        row.feed = row.feed + self._force(row)
        return row

    def _force(self, row: _Row) -> list[int]:
        """Accept the text the grammar forces next; returns the tokens the model must still see.

        Trailing whitespace is left to the model: in the few-shot text the space after ``":`` belongs
        to the value's token (`` null``, `` "``), so committing it alone would feed the model a
        tokenization it never saw. A row whose forced text completes the grammar is done.
        """
        if row.matcher.is_completed():  # a guessed token can close the output by itself
            row.done = True
            return []
        forced = row.matcher.find_jump_forward_string()
        committed = forced.rstrip()
        if not committed:
            return []
        ids = self._encode(committed)
        for token in ids:
            if not row.matcher.accept_token(token):
                raise RuntimeError(f"grammar rejected its own forced text {committed!r}")
        row.out_ids.extend(ids)
        if row.matcher.is_completed():
            row.done = True
            return []
        return ids

    def _length_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows sorted by prefill length, split where padding the group would waste too much (packed
        steps pad nothing: one group)."""
        ordered = sorted(rows, key=lambda r: len(r.feed), reverse=True)
        if self.packed:
            return [ordered] if ordered else []
        groups: list[list[_Row]] = []
        current: list[_Row] = []
        for row in ordered:
            if current:
                longest = len(current[0].feed)
                total = sum(len(r.feed) for r in current) + len(row.feed)
                waste = 1.0 - total / (longest * (len(current) + 1))
                if len(current) >= self.min_group and waste > self.max_pad_waste:
                    groups.append(current)
                    current = []
            current.append(row)
        if current:
            groups.append(current)
        return groups

    def _prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prompt prefix's per-layer keys/values, computed once per engine."""
        if self._prefix_kv is None:
            import torch

            ids = torch.tensor([self._prefix_ids], device=self.loaded.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
            log.info("engine.prefix_cached", tokens=len(self._prefix_ids))
        return self._prefix_kv

    def _stepper(self, batch: int, longest_feed: int) -> Stepper:
        if self._static is not None and self.use_prefix_cache and self._static.fits(batch, longest_feed):
            return self._static.start(batch, self._prefix_cache())
        return self._dynamic_stepper(batch, longest_feed)

    def _dynamic_stepper(self, batch: int, longest_feed: int) -> Stepper:
        if self.packed:
            return PackedStepper(self.model, self.loaded.device, batch, self._prefix_cache(), len(self._prefix_ids))
        prefix = self._prefix_cache() if self.use_prefix_cache else None
        return DynamicStepper(self.model, self.loaded.device, batch, prefix, shared=self._shared_prefix)

    def _decode_group(self, rows: list[_Row]) -> None:
        loop = DecodeLoop(self, self._stepper, self.last_stats)
        loop.add(rows)
        while loop.active:
            loop.step()

    def _step_width(self, rows: list[_Row]) -> int:
        """How many of its pending tokens each decoding row (prefill aside) feeds in this step.

        With ``balanced`` width on CPU a step costs about ``overhead + len(rows) * width`` positions,
        and a row whose whole feed fits reaches its next decision; the width that lets the most rows
        decide per unit of cost wins. Rows with a longer run feed part of it and the rest next step,
        at the same positions, so outputs do not change."""
        lengths = sorted(len(row.feed) for row in rows if row.steps > 0)
        if not lengths:
            return 0
        if not self.jump_forward:
            return 1
        # A packed step costs the tokens fed, not rows x widest: every row feeds its whole run.
        if self.jump_forward_width == "full" or self.device != "cpu" or self.packed:
            return lengths[-1]
        best_width, best_score = lengths[-1], 0.0
        for deciding, width in enumerate(lengths, start=1):
            score = deciding / (self.step_overhead_positions + len(rows) * width)
            if score > best_score:
                best_width, best_score = width, score
        return best_width

    def _guess_limit(self) -> int:
        """How many of a row's choices one pass may guess: a thrown-away guess needs no undoing only
        where each row's keys/values sit at its own positions (packed steps), and its place in the
        feed holds only where each step feeds a row's whole feed (jump-forward)."""
        return self.guess_choices if self.packed and self.jump_forward and self._static is None else 0

    def _plan_choices(self, row: _Row, guesses: int) -> None:
        """Mark the choice the row's feed leads to; guess it (and the choices after the text the guess
        forces) while the table has a confident guess that the grammar allows, up to ``guesses``."""
        import xgrammar as xgr

        while True:
            written = self.tokenizer.decode(row.out_ids) if guesses or self._null_bias else ""
            context = draft_context(written) if guesses else ("", False)
            bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)
            row.matcher.fill_next_token_bitmask(bitmask, 0)
            choice = _Choice(-1, len(row.out_ids), context, bitmask, self._null_bias_at(written))
            row.choices.append(choice)
            guess = self._guesses.guess(context) if len(row.choices) <= guesses else None
            if guess is None or not (int(bitmask[0, guess >> 5]) >> (guess & 31)) & 1:
                return
            if not row.matcher.accept_token(guess):
                raise RuntimeError(f"grammar rejected a token its mask allows: {guess}")
            choice.guess = guess
            choice.at = len(row.feed) - 1
            row.out_ids.append(guess)
            row.feed.append(guess)
            row.feed.extend(self._force(row))
            if row.done:
                # Done only once the pass keeps every guess (``_settle``); nothing follows the last
                # guess, so it is not fed: its logits are never needed.
                row.done = False
                row.feed.pop()
                return

    def _null_bias_at(self, written: str) -> float:
        """The bias null gets where the output so far is ``written`` (a field with a ``null_bias`` begins)."""
        written = written.rstrip()
        for key, bias in self._null_bias.items():
            if written.endswith(key):
                return bias
        return 0.0

    def _settle(self, row: _Row, settled: list[tuple[_Choice, int]], stats: DecodeStats, guesses: int) -> None:
        """Apply the model's choices at the row's planned places, in order: a guess the model chose
        stays; the first one it did not is rolled back with everything after it and replaced."""
        for choice, token in settled:
            stats.decisions += 1
            if guesses:
                self._guesses.learn(choice.context, token)
            if choice.guess is not None:
                stats.guessed += 1
            if choice.guess is not None and token == choice.guess:
                stats.guesses_kept += 1
                continue
            if choice.guess is not None:
                row.matcher.rollback(len(row.out_ids) - choice.written)
                del row.out_ids[choice.written :]
                # The guess's column and those after it are written over by the next step.
                row.position = row.fed_from + choice.at + 1
            self._decide(row, token)
            break
        else:
            # Every guess kept: a chain without a last unguessed choice ends where the grammar does.
            row.done = True
        row.choices = []
        if not row.done:
            self._plan_choices(row, guesses)

    def _decide(self, row: _Row, token: int) -> None:
        if not row.matcher.accept_token(token):
            raise RuntimeError(f"grammar rejected a masked token {token}")
        row.out_ids.append(token)
        if row.matcher.is_completed():
            row.done = True
            return
        row.feed = [token, *self._force(row)]

    def _result(self, row: _Row) -> ParseResult:
        text = self.tokenizer.decode(row.out_ids) if row.out_ids else ""
        try:
            raw = json.loads(text) if text else {}
        except json.JSONDecodeError:
            # Unreachable while the grammar holds; kept so one bad row cannot sink a batch.
            log.error("engine.invalid_output", text=text[:200])
            raw = {}
        parse, ungrounded = normalize_parse(raw, row.query, self.vocabulary)
        return ParseResult(parse=parse, ungrounded=ungrounded, tokens_in=row.tokens_in, tokens_out=len(row.out_ids))


class DecodeLoop:
    """The active rows of one running batch and the stepper behind them.

    ``add`` makes rows join at the next step (a new stepper when none is active); ``step`` runs one
    forward pass over every active row, chooses the tokens of the rows that decide, and returns the
    rows it finished, which leave the batch at once. Not thread-safe: the caller holds the engine's
    lock and ``torch.inference_mode`` around every call.
    """

    def __init__(self, engine: ConstrainedEngine, make_stepper: Callable[[int, int], Stepper],
                 stats: DecodeStats) -> None:
        self.engine = engine
        self.stats = stats
        self.active: list[_Row] = []
        self._make_stepper = make_stepper
        self._stepper: Stepper | None = None
        #: The last rows of ``active`` that joined since the last step and are not in the stepper yet.
        self._joining = 0

    def add(self, rows: list[_Row]) -> None:
        if not rows:
            return
        base = len(self.engine._prefix_ids) if self.engine.use_prefix_cache else 0
        guesses = self.engine._guess_limit()
        for row in rows:
            row.position = base
            row.steps = 0
            row.choices = []
            self.engine._plan_choices(row, guesses)
        if self._stepper is None or not self.active:
            self._stepper = self._make_stepper(len(rows), max(len(r.feed) for r in rows))
        elif isinstance(self._stepper, PackedStepper):
            self._stepper.add_rows(len(rows))  # their suffixes go into the running rows' next step
            self.stats.joined += len(rows)
        else:
            self._joining += len(rows)  # prefilled apart at the next step, then absorbed
            self.stats.joined += len(rows)
        self.active.extend(rows)

    def drop(self, leaving: list[_Row]) -> None:
        """These rows leave the batch unfinished (a cancelled request)."""
        gone = {id(row) for row in leaving}
        self._keep([i for i, row in enumerate(self.active) if id(row) not in gone])

    def reset(self) -> list[_Row]:
        """Forget the stepper (after a failed step); returns the rows that were active."""
        rows, self.active, self._stepper, self._joining = self.active, [], None, 0
        return rows

    def step(self) -> list[_Row]:
        import torch
        import xgrammar as xgr

        engine, stats, active = self.engine, self.stats, self.active
        if not active or self._stepper is None:
            return []
        joining, self._joining = self._joining, 0
        if joining:
            # The joiners' suffixes are prefilled in a pass of their own: in the running rows' pass
            # they would widen every row's step to the longest suffix.
            logits, due = self._forward(self._stepper, active[:-joining])
            prefilled = self._make_stepper(joining, max(len(r.feed) for r in active[-joining:]))
            joined_logits, joined_due = self._forward(prefilled, active[-joining:])
            logits, due = torch.cat([logits, joined_logits]), due + joined_due
            self._stepper.absorb(prefilled)
        else:
            logits, due = self._forward(self._stepper, active)
        if due:
            xgr.apply_token_bitmask_inplace(logits, torch.cat([choice.bitmask for _, choice in due]))
            for k, (_, choice) in enumerate(due):
                if choice.null_bias:
                    logits[k, engine._null_ids] += choice.null_bias
            chosen = logits.argmax(dim=-1).tolist()
            by_row: dict[int, tuple[_Row, list[tuple[_Choice, int]]]] = {}
            for (row, choice), token in zip(due, chosen, strict=True):
                by_row.setdefault(id(row), (row, []))[1].append((choice, int(token)))
            guesses = engine._guess_limit()
            for row, settled in by_row.values():
                engine._settle(row, settled, stats, guesses)
        for row in active:
            if not row.done and row.steps >= MAX_STEPS:
                log.warning("engine.step_limit", query_chars=len(row.query))
                row.done = True
                row.out_ids = []
        finished = [r for r in active if r.done]
        if finished:
            self._keep([i for i, r in enumerate(active) if not r.done])
        return finished

    def _forward(self, stepper: Stepper, rows: list[_Row]) -> tuple[torch.Tensor, list[tuple[_Row, _Choice]]]:
        """One forward pass of ``stepper`` over ``rows``' next chunks; the choices it reaches (the
        planned choices of every row whose feed it used up) and their logits, in that order."""
        import torch

        engine, stats = self.engine, self.stats
        step_width = engine._step_width(rows)
        chunks = [r.feed if r.steps == 0 else r.feed[:step_width] for r in rows]
        width = max(len(c) for c in chunks)
        ids = torch.full((len(rows), width), engine._pad_id, dtype=torch.long)
        step_mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        due: list[tuple[_Row, _Choice]] = []
        due_rows: list[int] = []
        #: Where each due choice's logits are in a packed step's token sequence.
        picks: list[int] = []
        packed_offset = 0
        for i, (row, chunk) in enumerate(zip(rows, chunks, strict=True)):
            n = len(chunk)
            # Left-pad inside the step so every row's last real token is the last column.
            ids[i, width - n :] = torch.tensor(chunk, dtype=torch.long)
            step_mask[i, width - n :] = 1
            positions[i, :] = row.position
            positions[i, width - n :] = torch.arange(row.position, row.position + n)
            row.fed_from = row.position
            row.position += n
            row.feed = row.feed[n:]
            row.steps += 1
            if not row.feed:
                due_rows.append(i)
                for choice in row.choices:
                    due.append((row, choice))
                    picks.append(packed_offset + (choice.at if choice.at >= 0 else n - 1))
            packed_offset += n
        if isinstance(stepper, PackedStepper):
            logits = stepper.step(ids, step_mask, positions, picks=picks)
        else:
            if len(due) != len(due_rows):
                raise RuntimeError("guessed choices need packed steps")
            logits = stepper.step(ids, step_mask, positions)[due_rows]
        stats.forwards += 1
        fed = sum(len(c) for c in chunks)
        computed = fed if isinstance(stepper, PackedStepper) else len(rows) * width
        stats.positions += computed
        stats.padded_positions += computed - fed
        return logits, due

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.active):
            return
        if keep and self._stepper is not None:
            self._stepper.keep(keep)
        else:
            self._stepper = None
        self.active = [self.active[i] for i in keep]


def version_for(settings: Settings) -> str:
    """The version an engine built from ``settings`` will have, without loading the model: the
    worker opens its cache (and serves cache hits) while the model still loads."""
    from workers.model import card_for, model_id_for

    spec = load_checked_spec(settings.parse_spec)
    return engine_version(model_id_for(settings), spec, settings.grounding, card_for(settings, spec.fingerprint))


def build_engine(settings: Settings, loaded: LoadedModel | None = None) -> ParseEngine:
    """Load the parse spec, the model (unless given), and build the engine for ``settings``.

    The spec is loaded first: a bad spec fails at once, before minutes of model loading."""
    from workers.model import load_model

    spec = load_checked_spec(settings.parse_spec)
    if loaded is None:
        loaded = load_model(settings, spec_fingerprint=spec.fingerprint)
    engine = ConstrainedEngine(settings, loaded, spec)
    log.info("engine.built", model=engine.model_id, grounding=engine.grounding, spec=spec.name,
             spec_version=spec.version, version=engine.version)
    return engine

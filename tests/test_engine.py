"""Engine mechanics on a tiny random Llama (fast) and quality on the real default model (e2e)."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.settings import Settings
from schemas.spec import ParseSpec, load_spec, parse_spec_data
from schemas.vocabulary import Vocabulary
from tests.engine_fixtures import real_loaded, tiny_loaded
from tests.test_grammar import ADVERSARIAL
from workers.engine import ConstrainedEngine, build_engine, engine_version
from workers.model import LoadedModel, load_model
from workers.prompt import full_prompt, prompt_prefix, prompt_suffix

__all__ = ["real_loaded", "tiny_loaded"]

QUERIES = [
    "grey velvet sofa",
    "oak dining table with 6 chairs",
    "blk leather recliner",
    "mid century walnut credenza",
    "queen bed frame",
    "rose gold bar cart",
    "lamp",
    "chair and a half recliner",
]


FURNITURE = load_spec("furniture")
PARSE_FIELDS = FURNITURE.field_names


def make_engine(loaded: LoadedModel, **kwargs: Any) -> ConstrainedEngine:
    settings = Settings(device="cpu", cpu_threads=2, jump_forward=bool(kwargs.pop("jump_forward", False)),
                        jump_forward_width=kwargs.pop("jump_forward_width", "balanced"),
                        decode_layout=kwargs.pop("decode_layout", "auto"))
    return ConstrainedEngine(settings, loaded, kwargs.pop("spec", FURNITURE), **kwargs)


def assert_valid(results: list, queries: list[str], spec: ParseSpec = FURNITURE) -> None:
    assert len(results) == len(queries)
    for result in results:
        assert set(result.parse) == set(spec.field_names)
        spec.parse_model.model_validate(result.parse)
        assert result.tokens_out > 0


def test_adversarial_batch_is_valid_and_ordered(tiny_loaded: LoadedModel) -> None:
    engine = make_engine(tiny_loaded)
    queries = [*ADVERSARIAL, *QUERIES]
    results = engine.parse_batch(queries)
    assert_valid(results, queries)
    vocabulary = Vocabulary(FURNITURE)
    for query, result in zip(queries, results, strict=True):
        for name in ("material", "color", "style"):
            value = result.parse[name]
            assert value is None or value in vocabulary.candidates(name, query), (query, name, value)
        assert result.ungrounded == []
    # A query with no vocabulary word is decided without the model: every facet null.
    emoji = results[queries.index("😀" * 500)]
    assert emoji.parse == dict.fromkeys(PARSE_FIELDS)
    assert engine.parse_batch([]) == []


def test_prefix_cache_gives_same_outputs(tiny_loaded: LoadedModel) -> None:
    cached = make_engine(tiny_loaded).parse_batch(QUERIES)
    uncached = make_engine(tiny_loaded, use_prefix_cache=False).parse_batch(QUERIES)
    assert [r.parse for r in cached] == [r.parse for r in uncached]


def test_jump_forward_and_grouping_do_not_change_outputs(tiny_loaded: LoadedModel) -> None:
    plain = make_engine(tiny_loaded).parse_batch(QUERIES)
    jumped = make_engine(tiny_loaded, jump_forward=True).parse_batch(QUERIES)
    split = make_engine(tiny_loaded, min_group=1, max_pad_waste=0.0).parse_batch(QUERIES)
    one_by_one = [make_engine(tiny_loaded).parse_batch([q])[0] for q in QUERIES[:3]]
    assert [r.parse for r in jumped] == [r.parse for r in plain]
    assert [r.parse for r in split] == [r.parse for r in plain]
    assert [r.parse for r in one_by_one] == [r.parse for r in plain[:3]]


def test_balanced_step_width_pads_less_with_the_same_outputs(tiny_loaded: LoadedModel) -> None:
    full = make_engine(tiny_loaded, jump_forward=True, jump_forward_width="full", decode_layout="padded")
    # A small batch is all overhead at the CPU's default weight; a weight of 0 makes every step choose.
    balanced = make_engine(tiny_loaded, jump_forward=True, jump_forward_width="balanced", step_overhead_positions=0,
                           decode_layout="padded")
    queries = [*QUERIES, *ADVERSARIAL[:4]]
    full_parses = [r.parse for r in full.parse_batch(queries)]
    balanced_parses = [r.parse for r in balanced.parse_batch(queries)]
    assert balanced_parses == full_parses
    # Some step had rows with forced runs of different lengths; the narrower steps padded less.
    assert full.last_stats.padded_positions > balanced.last_stats.padded_positions


@pytest.mark.parametrize("jump_forward", [False, True], ids=["token_by_token", "jump_forward"])
def test_packed_steps_match_padded_steps(tiny_loaded: LoadedModel, jump_forward: bool) -> None:
    queries = [*QUERIES, *ADVERSARIAL[:6]]
    padded = make_engine(tiny_loaded, jump_forward=jump_forward, decode_layout="padded")
    packed = make_engine(tiny_loaded, jump_forward=jump_forward, decode_layout="packed")
    assert packed.packed and not padded.packed
    assert [r.parse for r in packed.parse_batch(queries)] == [r.parse for r in padded.parse_batch(queries)]
    # Rows of every length in one group, and no position fed but a real token.
    assert packed.last_stats.groups == 1 and packed.last_stats.padded_positions == 0
    assert padded.last_stats.padded_positions > 0


def test_static_cache_path_matches_dynamic(tiny_loaded: LoadedModel) -> None:
    from workers.static_decode import StaticDecoder

    dynamic = make_engine(tiny_loaded, decode_layout="padded").parse_batch(QUERIES)
    engine = make_engine(tiny_loaded, decode_layout="padded")
    engine._static = StaticDecoder(tiny_loaded.model, "cpu", len(engine._prefix_ids), compile_model=False)
    static = engine.parse_batch(QUERIES)
    assert [r.parse for r in static] == [r.parse for r in dynamic]


def test_prompt_split_keeps_tokenization(tiny_loaded: LoadedModel) -> None:
    tokenizer = tiny_loaded.tokenizer
    for query in QUERIES:
        prefix = tokenizer(prompt_prefix(FURNITURE))["input_ids"]
        joined = prefix + tokenizer(prompt_suffix(query), add_special_tokens=False)["input_ids"]
        assert joined == tokenizer(full_prompt(FURNITURE, query))["input_ids"]


def test_the_bpe_tokenizer_decodes_without_the_cleanup_it_ignores(tiny_loaded: LoadedModel) -> None:
    """The config's clean_up_tokenization_spaces would only make transformers warn at the first decode."""
    tokenizer = tiny_loaded.tokenizer
    assert tokenizer.clean_up_tokenization_spaces is False
    text = "sofa , red . 32 ' tv"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_version_tracks_inputs() -> None:
    base = engine_version("m", FURNITURE, "catalog")
    assert base == engine_version("m", load_spec("furniture"), "catalog")
    assert base != engine_version("m", FURNITURE, "span")
    assert base != engine_version("other", FURNITURE, "catalog")
    assert base != engine_version("m", FURNITURE.model_copy(update={"version": "2"}), "catalog")
    assert base != engine_version("m", load_spec("ecommerce"), "catalog")
    # Any change to what the model is shown or allowed changes the version: one synonym, one example.
    color = FURNITURE.field("color")
    more_forms = FURNITURE.model_copy(update={"fields": [
        f if f.name != "color" else color.model_copy(update={"values": [*color.values[:-1], color.values[-1].model_copy(
            update={"forms": [*color.values[-1].forms, "new form"]})]}) for f in FURNITURE.fields]})
    assert base != engine_version("m", more_forms, "catalog")
    assert base != engine_version("m", FURNITURE.model_copy(update={"examples": FURNITURE.examples[:-1]}), "catalog")
    assert len(base) == 12


def kitchen_spec(maker_null_bias: float) -> ParseSpec:
    return parse_spec_data({
        "name": "kitchenware", "version": "1", "description": "kitchenware",
        "fields": [
            {"name": "item", "kind": "span", "description": "The kind of item, e.g. 'garlic press'."},
            {"name": "maker", "kind": "span", "description": "The brand, e.g. 'oxo'.", "fill": "mentioned",
             "mentions": ["oxo"], "null_bias": maker_null_bias},
        ],
        "examples": [
            {"query": "lodge cast iron skillet", "parse": {"item": "cast iron skillet", "maker": "lodge"}},
            {"query": "wooden spoon set", "parse": {"item": "wooden spoon set"}},
            {"query": "cuisinart food processor", "parse": {"item": "food processor", "maker": "cuisinart"}},
        ],
    })


KITCHEN_QUERIES = ["vitamix blender", "kitchenaid stand mixer", "garlic press", "le creuset dutch oven",
                   "pyrex measuring cup", "bamboo cutting board", "oxo salad spinner"]


@pytest.mark.e2e
def test_null_bias_raises_the_bar_for_values_the_model_chooses(real_loaded: LoadedModel) -> None:
    results = {bias: make_engine(real_loaded, spec=kitchen_spec(bias), jump_forward=True).parse_batch(KITCHEN_QUERIES)
               for bias in (0.0, 2.0, 20.0)}
    makers = {bias: [r.parse["maker"] for r in found] for bias, found in results.items()}
    chosen = {bias: sum(m is not None for m in found[:-1]) for bias, found in makers.items()}
    assert chosen[0.0] >= 2, makers  # the model names brands from the examples' pattern unbiased
    assert chosen[0.0] >= chosen[2.0] >= chosen[20.0] == 0, makers
    # A value the grammar forces (a catalogued maker with fill: mentioned) is written whatever the bias.
    assert all(found[-1] == "oxo" for found in makers.values()), makers
    # The field before the biased one is decided as without the bias.
    items = {bias: [r.parse["item"] for r in found] for bias, found in results.items()}
    assert items[0.0] == items[2.0] == items[20.0]
    assert engine_version("m", kitchen_spec(0.0), "catalog") != engine_version("m", kitchen_spec(2.0), "catalog")


DECODE_PATHS = {
    "padded, token by token": {"decode_layout": "padded"},
    "padded, jump-forward": {"decode_layout": "padded", "jump_forward": True},
    "packed, token by token": {"decode_layout": "packed"},
    "packed, jump-forward": {"decode_layout": "packed", "jump_forward": True},
}


@pytest.mark.e2e
def test_null_bias_acts_on_every_decode_path(real_loaded: LoadedModel) -> None:
    # The real model: the tiny random one writes null everywhere unbiased, so the bias would show nothing.
    expected = [None] * (len(KITCHEN_QUERIES) - 1) + ["oxo"]
    for path, options in DECODE_PATHS.items():
        engine = make_engine(real_loaded, spec=kitchen_spec(20.0), **options)
        assert [r.parse["maker"] for r in engine.parse_batch(KITCHEN_QUERIES)] == expected, path
    # Rows that join a running batch one by one (the continuous batcher) get the same bias.
    engine = make_engine(real_loaded, spec=kitchen_spec(20.0), decode_layout="packed", jump_forward=True)
    try:
        assert [engine.submit(q).result(timeout=120).parse["maker"] for q in KITCHEN_QUERIES] == expected
    finally:
        engine.close()


@pytest.mark.parametrize("grounding", ["span", "free"])
def test_other_grounding_modes_stay_valid(tiny_loaded: LoadedModel, grounding: str) -> None:
    settings = Settings(device="cpu", cpu_threads=2, grounding=grounding)
    engine = build_engine(settings, tiny_loaded)
    queries = ADVERSARIAL[:6] + QUERIES[:2]
    assert_valid(engine.parse_batch(queries), queries)


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_quality(real_loaded: LoadedModel, dtype: str) -> None:
    """The default spec's quality holds in fp32 (the CPU default) and in bf16 (a GPU's default, and the
    CPU's opt-in), where rounding flips a few close decisions."""
    from workers.evaluation import load_quality, score

    settings = Settings(device="cpu", cpu_threads=2, dtype=dtype)  # type: ignore[arg-type]
    loaded = real_loaded if dtype == "float32" else load_model(settings)
    assert str(loaded.dtype) == f"torch.{dtype}"
    engine = build_engine(settings, loaded)
    cases = load_quality(FURNITURE)
    parses: list[dict[str, str | None] | None] = []
    for start in range(0, len(cases), 48):
        parses += [r.parse for r in engine.parse_batch([c.query for c in cases[start : start + 48]])]
    metrics = score(FURNITURE, cases, parses)
    assert metrics["schema_valid"] == 1.0
    assert metrics["core_fields_acc"] >= 0.6, metrics
    assert metrics["invented_absent"] <= 0.05, metrics


def test_cuda_keeps_attention_off_cudnn_and_the_cpu_leaves_the_switch_alone() -> None:
    import torch

    from workers.model import avoid_cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)

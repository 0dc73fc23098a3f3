"""Parse specs: the fields a deployment extracts from its queries, declared in a YAML file.

A spec names its domain, lists its fields and shows a few example parses. Everything that depends on
the fields derives from the active spec (``QUSTREAM_PARSE_SPEC``, a built-in name or a path): the
parse's pydantic model, the output grammar, the prompt, the cache version, the exported JSON Schema,
``qustream eval`` scoring, the demo and ``tail`` columns, and the metrics labels.

Field kinds:

- ``span``: null or a run of the query's own words, optionally lowercased and singularised. A span
  field may also know its values: ``mentions`` (phrases such as a brand catalog) and ``patterns``
  (regular expressions such as '32 inch' sizes) that, found in the query, are offered to the model
  or, with ``fill: mentioned``, taken without asking it. ``heads`` (the head nouns of product
  types) restrict the runs offered to those ending in one, and leave the field null in a query that
  says none (or, with ``without_head: runs``, offer every run there). ``null_bias`` (any kind) holds
  the model to a higher bar before it writes a value rather than null.
- ``vocabulary``: null or one canonical value whose surface form (the value or a synonym) occurs in
  the query. Values may sit in a separate file, so a catalog can list thousands of facet values.
- ``category``: null or one label of a closed set that need not occur in the query (a department,
  an intent); the model chooses and the grammar restricts it to the set.

A spec file may ``extends`` another (a built-in name or a relative path) and give only what changes:
its fields merge into the base's by name. Loading checks the structure here; the examples are
checked against the grammar's notion of spans and vocabulary mentions by
``workers.grammar.check_examples`` when an engine is built or ``qustream spec check`` runs, against the
fields without problems where others have some (``SpecError.partial``), so that one run lists them all.
A YAML number where text belongs (``version: 1.10``) is refused: quoted, it stays as written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

BUILTIN_SPEC_DIR = Path(__file__).parent / "specs"
DEFAULT_SPEC = "furniture"

FieldKind = Literal["span", "vocabulary", "category"]
Normalisation = Literal["lowercase", "singular"]
FillRule = Literal["model", "mentioned"]

_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
#: Field names that would collide with the parsed event's own keys when flattened by consumers.
_RESERVED = frozenset({"query", "query_id", "spec", "parse"})


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and every problem with its field."""

    def __init__(self, message: str, problems: list[str] | None = None, source: str | None = None,
                 partial: ParseSpec | None = None, unchecked: list[UncheckedValue] | None = None) -> None:
        super().__init__(message)
        #: Each problem alone (without the file), where the spec was read: what a caller merges.
        self.problems = problems if problems is not None else [message]
        #: The file (or name) the problems are in, where the spec was read.
        self.source = source
        #: The spec without the fields that have problems (and those fields' example values), where it
        #: validates: what the later checks (the examples against the grammar) can still run on.
        self.partial = partial
        #: Example values of the fields left out of ``partial``, for the checks that need no valid field.
        self.unchecked = unchecked or []

    @classmethod
    def listing(cls, source: str, problems: list[str], partial: ParseSpec | None = None,
                unchecked: list[UncheckedValue] | None = None) -> SpecError:
        """The error of a spec read from ``source`` with these problems, one a line."""
        return cls(f"{source}: invalid parse spec:\n  - " + "\n  - ".join(problems), problems, source, partial,
                   unchecked)


@dataclass(frozen=True)
class UncheckedValue:
    """An example's value for a field that did not validate: only what holds for every kind is checked."""

    example: int
    query: str
    field: str
    value: str
    #: The values and forms the field lists (its values, mentions), whatever its kind.
    known: tuple[str, ...]


class SpecValue(BaseModel):
    """One canonical value and its other surface forms ('gray' with 'grey', 'gry')."""

    model_config = ConfigDict(extra="forbid")

    value: Annotated[str, Field(min_length=1, max_length=80)]
    forms: list[Annotated[str, Field(min_length=1, max_length=80)]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_plain_string(cls, data: Any) -> Any:
        return {"value": data} if isinstance(data, str) else data


class SpecField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="JSON key of the field in the parse: lowercase letters, digits, underscores.")
    kind: FieldKind
    description: str = Field(min_length=1, description="What the field holds; the prompt and the docs use it.")
    normalize: list[Normalisation] = Field(
        default_factory=lambda: list[Normalisation](["lowercase"]),
        description="span fields: how a chosen run of words is written ('singular' singularises the head noun).",
    )
    trim_edges: bool = Field(
        True,
        description="span fields: runs never start or end with a connective, quantity, size word or number "
        "(right for product names, wrong for sizes such as '32 inch').",
    )
    max_words: int = Field(5, ge=1, le=12, description="span fields: longest run of query words offered.")
    stop_at: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=list,
        description="span fields: words that end the part of the query a run is taken from, unless the query "
        "starts with one ('for', 'with': the product of 'case for iphone' is 'case', not 'iphone').",
    )
    fill: FillRule = Field(
        "model",
        description="vocabulary fields, and span fields with mentions or patterns: 'model' lets the model choose "
        "a mentioned value or null (a span field: or another run of the query's words); 'mentioned' takes a "
        "mentioned value whenever no other field claims those words, without asking the model (for "
        "unambiguous words such as 'womens'; the model still chooses among several mentions).",
    )
    mentions: list[Annotated[str, Field(min_length=1, max_length=80)]] = Field(
        default_factory=list,
        description="span fields: phrases that are this field's value where the query says them (a brand "
        "catalog); matched as whole words, case and punctuation aside, the longest mention first.",
    )
    mentions_file: str | None = Field(
        None, description="span fields: more mentions from a text file beside the spec, one phrase a line."
    )
    patterns: list[Annotated[str, Field(min_length=1, max_length=400)]] = Field(
        default_factory=list,
        description="span fields: regular expressions (Python syntax) over the lowercased query whose matches "
        "are this field's value ('\\d+ ?(inch|ft)' for sizes); a match is a mention, as above.",
    )
    heads: list[Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=list,
        description="span fields: the words a value may end with, written singular (the head nouns of product "
        "types: 'case', 'shoe'); a query word matches as written or singular. A query that says none of them "
        "leaves the field null. Catalog grounding only.",
    )
    heads_file: str | None = Field(
        None, description="span fields: more heads from a text file beside the spec, one word a line."
    )
    without_head: Literal["null", "runs"] = Field(
        "null",
        description="span fields with heads: what a query that ends no run in a head gets: 'null' (the field is "
        "null), or 'runs' (every run is offered, as without heads: for a model trained to choose, since heads "
        "taken from labelled queries miss the rare and misspelled ones).",
    )
    extend_mentions: bool = Field(
        False,
        description="span fields with fill: mentioned: also offer the longer runs of the query that contain a "
        "mentioned value, and let the model choose ('pencil case' where the catalog knows 'case'); for a model "
        "trained to choose.",
    )
    null_bias: float = Field(
        0.0,
        ge=0.0,
        le=20.0,
        description="how much more the model must prefer writing a value over null before it writes one, in "
        "logits (0: plain greedy choice). Trades the field's recall for fewer invented values where the model "
        "decides (a brand no catalog knows); values the grammar forces are unaffected.",
    )
    values: list[SpecValue] = Field(
        default_factory=list, description="vocabulary and category fields: the canonical values."
    )
    values_file: str | None = Field(
        None,
        description="vocabulary and category fields: more values from a file beside the spec (YAML/JSON list "
        "of values or {value, forms}; or text, one value a line, its forms after commas).",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_key(cls, name: str) -> str:
        if not _FIELD_NAME.match(name):
            raise ValueError(f"{name!r} is not a field name (lowercase letters, digits, '_', starting with a letter)")
        if name in _RESERVED:
            raise ValueError(f"{name!r} is reserved (an event key); choose another name")
        return name

    @model_validator(mode="after")
    def _values_match_kind(self) -> SpecField:
        # Every problem, one a line (``parse_spec_data`` lists each with the field's name).
        problems = self._option_problems()
        if self.kind == "span":
            if self.values or self.values_file:
                problems.append("a span field takes no values (mentions are its known values)")
            problems += self._known_value_problems()
        elif not self.values:
            problems.append(f"a {self.kind} field needs values (or a values_file)")
        else:
            problems += self._surface_form_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _option_problems(self) -> list[str]:
        """Options the field's kind (or its other options) does not take."""
        problems = []
        if self.kind != "span":
            for option in ("stop_at", "mentions", "mentions_file", "patterns", "heads", "heads_file",
                           "extend_mentions"):
                if getattr(self, option):
                    problems.append(f"{option} applies to span fields only")
        if self.fill != "model" and not (
            self.kind == "vocabulary" or (self.kind == "span" and (self.mentions or self.patterns))
        ):
            problems.append(f"fill: {self.fill} applies to vocabulary fields and to span fields with mentions or "
                            "patterns")
        if self.without_head != "null" and not (self.kind == "span" and (self.heads or self.heads_file)):
            problems.append("without_head applies to span fields with heads")
        if self.extend_mentions and self.fill != "mentioned":
            problems.append("extend_mentions applies to fields with fill: mentioned")
        return problems

    def _surface_form_problems(self) -> list[str]:
        problems = []
        seen: dict[str, str] = {}
        for entry in self.values:
            for form in (entry.value, *entry.forms):
                key = match_form(form)
                if not key:
                    problems.append(f"value or form {form!r} has no letters or digits")
                elif seen.get(key, entry.value) != entry.value:
                    problems.append(f"surface form {form!r} belongs to both {seen[key]!r} and {entry.value!r}")
                else:
                    seen[key] = entry.value
        return problems

    def _known_value_problems(self) -> list[str]:
        problems = []
        for mention in self.mentions:
            if not match_form(mention):
                problems.append(f"mention {mention!r} has no letters or digits")
        for pattern in self.patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                problems.append(f"pattern {pattern!r} is not a regular expression: {exc}")
                continue
            if compiled.match(""):
                problems.append(f"pattern {pattern!r} matches empty text")
        for head in self.heads:
            if len(match_form(head).split()) != 1:
                problems.append(f"head {head!r} is not one word")
        return problems

    @property
    def canonical_values(self) -> list[str]:
        return [entry.value for entry in self.values]

    @cached_property
    def head_words(self) -> frozenset[str]:
        return frozenset(match_form(head) for head in self.heads)

    @cached_property
    def compiled_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(pattern) for pattern in self.patterns)


class SpecExample(BaseModel):
    """A query and its parse, shown to the model before every real query."""

    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, Field(min_length=1, max_length=256)]
    parse: dict[str, str | None]


class ParseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    version: Annotated[str, Field(min_length=1, max_length=32)]
    description: str = Field(min_length=1, description="One line on the domain, e.g. 'furniture and home decor'.")
    instruction: str | None = Field(
        None, description="The prompt's first line; by default written from the description and the fields."
    )
    fields: list[SpecField] = Field(min_length=1, max_length=16)
    examples: list[SpecExample] = Field(default_factory=list, max_length=32)
    core_fields: list[str] | None = Field(
        None, description="Fields of the headline 'core fields right' rate in `qustream eval` (default: all)."
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_text(cls, value: Any) -> Any:
        # A YAML number is refused rather than turned into text: 1.10 would become "1.1" (the version of
        # another spec), and one rule for every text of a spec (quote a number) is easier to keep.
        if isinstance(value, bool | int | float):
            raise ValueError(unquoted_scalar(value, "version"))
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ParseSpec:
        problems = consistency_problems([f.name for f in self.fields],
                                        [(e.query, list(e.parse)) for e in self.examples], self.core_fields)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived ------------------------------------------------------------------------------
    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> SpecField:
        for spec_field in self.fields:
            if spec_field.name == name:
                return spec_field
        raise KeyError(name)

    @property
    def headline_fields(self) -> tuple[str, ...]:
        return tuple(self.core_fields) if self.core_fields else self.field_names

    @property
    def ref(self) -> dict[str, str]:
        """What every parsed event carries: which contract its parse follows."""
        return {"name": self.name, "version": self.version}

    def canonical_json(self) -> str:
        """Stable serialisation of everything that can change a parse; hashed into the cache version."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]

    @cached_property
    def parse_model(self) -> type[BaseModel]:
        """The pydantic model of this spec's parse: every field nullable, no other keys.

        Category fields take only their labels (an enum in the JSON Schema). Vocabulary fields are
        strings: canonical values under catalog grounding, but span and free grounding may write other
        words, and a catalog of thousands of values would make an unwieldy schema.
        """
        definitions: dict[str, Any] = {}
        for spec_field in self.fields:
            annotation: Any = str | None
            if spec_field.kind == "category":
                annotation = Literal[tuple(spec_field.canonical_values)] | None
            definitions[spec_field.name] = (annotation, Field(None, description=spec_field.description))
        model: type[BaseModel] = create_model(
            _model_name(self.name),
            __config__=ConfigDict(extra="forbid", title=f"{self.name} parse (spec version {self.version})"),
            __doc__=f"The parse of a query under the '{self.name}' spec: {self.description}. Null means not said.",
            **definitions,
        )
        return model


def consistency_problems(names: list[str], examples: list[tuple[Any, list[Any]]], core_fields: Any) -> list[str]:
    """The spec-wide problems: duplicate field names, examples and core fields naming no field. Given the
    field names, each example's (query, parse keys) and the core fields, raw or validated."""
    problems = []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"fields: duplicate names {duplicates}")
    known = list(dict.fromkeys(names))
    for index, (query, keys) in enumerate(examples):
        unknown = sorted({k for k in keys if isinstance(k, str)} - set(names))
        if unknown:
            problems.append(f"{_example_where(index, query)}: unknown fields {unknown}; fields are {known}")
    if isinstance(core_fields, list):
        unknown_core = sorted({c for c in core_fields if isinstance(c, str)} - set(names))
        if unknown_core:
            problems.append(f"core_fields: unknown fields {unknown_core}")
    return problems


def _example_where(index: int, query: Any) -> str:
    """How every problem names an example: its index and query."""
    return f"examples[{index}] ({query!r})" if isinstance(query, str) else f"examples[{index}]"


def unquoted_scalar(value: Any, key: str | None) -> str:
    """Why a YAML number or boolean is refused where text belongs, and how to write it."""
    if isinstance(value, bool):
        return "unquoted, yes, no, on, off, true and false are YAML booleans, not text: write it in quotes"
    text = getattr(value, "text", None) or str(value)
    read = f" (read as {value!r})" if text != str(value) else ""
    written = f'{key}: "{text}"' if key else f'"{text}"'
    return f"unquoted, {text} is a YAML number{read}, not text: write it in quotes, {written}"


def _model_name(spec_name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^a-z0-9]+", spec_name) if part) + "Parse"


_SEPARATORS = re.compile(r"[^\w']+|_+")


def match_form(text: str) -> str:
    """The form used to compare surface forms with queries: lowercase, punctuation and spaces as one space."""
    return _SEPARATORS.sub(" ", text.lower()).strip()


# -- loading ----------------------------------------------------------------------------------
def builtin_specs() -> list[str]:
    return sorted(path.stem for path in BUILTIN_SPEC_DIR.glob("*.yaml"))


def resolve_spec_path(ref: str | Path) -> Path:
    """A built-in name or a path to a YAML file; an unknown name lists the built-in ones."""
    text = str(ref).strip()
    if not text:
        raise SpecError(f"no parse spec given; built-in specs: {', '.join(builtin_specs())}")
    looks_like_path = isinstance(ref, Path) or "/" in text or text.endswith((".yaml", ".yml", ".json"))
    if not looks_like_path:
        path = BUILTIN_SPEC_DIR / f"{text}.yaml"
        if not path.is_file():
            raise SpecError(f"unknown built-in parse spec {text!r}; built-in specs: {', '.join(builtin_specs())} "
                            "(or give the path of a YAML file)")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        raise SpecError(f"parse spec file {str(path)!r} does not exist")
    return path


#: Field options that name a file, read relative to the spec that names it.
_FILE_OPTIONS = ("values_file", "mentions_file", "heads_file")
#: Where a field's files are, per option, while ``extends`` merges fields of specs in other folders.
_FOLDERS = "__folders__"


def load_spec(ref: str | Path = DEFAULT_SPEC) -> ParseSpec:
    """Read, resolve ``extends`` and values files, and validate a spec; ``SpecError`` lists every problem."""
    path = resolve_spec_path(ref)
    data = _read_spec_data(path, ())
    problems: list[str] = []
    unread: set[int] = set()
    for index, raw_field in enumerate(data.get("fields") or []):
        if not isinstance(raw_field, dict):
            continue
        folders = raw_field.pop(_FOLDERS, {})
        try:
            if raw_field.get("values_file"):
                extra = _read_values(folders["values_file"], raw_field["values_file"])
                raw_field["values"] = [*(raw_field.get("values") or []), *extra]
            if raw_field.get("mentions_file"):
                phrases = _read_values(folders["mentions_file"], raw_field["mentions_file"], "mentions_file")
                raw_field["mentions"] = [*(raw_field.get("mentions") or []), *(p["value"] for p in phrases)]
            if raw_field.get("heads_file"):
                words = _read_values(folders["heads_file"], raw_field["heads_file"], "heads_file")
                raw_field["heads"] = [*(raw_field.get("heads") or []), *(w["value"] for w in words)]
        except SpecError as exc:
            problems.append(f"{_field_where(index, raw_field)}: {exc}")
            unread.add(index)
    if problems:
        # The rest of the spec is checked too, so that one run lists every problem; a field whose file
        # could not be read is left out of that check (it would only add that it has no values).
        partial, unchecked = None, []
        try:
            parse_spec_data(data, source=str(path), skip_fields=unread)
            partial = _partial_spec(data, [], unread)
        except SpecError as exc:
            problems.extend(exc.problems)
            partial, unchecked = exc.partial, exc.unchecked
        raise SpecError.listing(str(path), problems, partial, unchecked)
    return parse_spec_data(data, source=str(path))


class _YamlInt(int):
    #: The number as the file writes it.
    text = ""


class _YamlFloat(float):
    text = ""


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, its numbers keeping the text they were written as: a number where text
    belongs is refused with the quoted form to write (YAML reads 1.10 as 1.1)."""


def _number_with_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | float:
    value = loader.construct_yaml_int(node) if node.tag.endswith(":int") else loader.construct_yaml_float(node)
    number = _YamlInt(value) if isinstance(value, int) else _YamlFloat(value)
    number.text = str(node.value)
    return number


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _number_with_text)
_SpecLoader.add_constructor("tag:yaml.org,2002:float", _number_with_text)


def _read_spec_data(path: Path, extending: tuple[Path, ...]) -> dict[str, Any]:
    """A spec file's mapping with ``extends`` merged in: the base spec's (a built-in name, or a path
    relative to this file) with this file's keys over it, and its fields merged by name (this file's
    options over the base field's; fields the base lacks added after its own). A file option stays as
    written (it is part of the spec's fingerprint) and is read from the folder of the spec that set it."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SpecLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a mapping with name, version, description, fields, examples")
    for raw_field in data.get("fields") or []:
        if isinstance(raw_field, dict):
            raw_field[_FOLDERS] = {option: path.parent for option in _FILE_OPTIONS if option in raw_field}
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data
    if not isinstance(base_ref, str) or not base_ref.strip():
        raise SpecError(f"{path}: extends names a spec: a built-in name or a YAML path")
    looks_like_path = "/" in base_ref or base_ref.endswith((".yaml", ".yml", ".json"))
    try:
        base_path = resolve_spec_path(path.parent / base_ref if looks_like_path else base_ref).resolve()
    except SpecError as exc:
        raise SpecError(f"{path}: extends: {exc}") from None
    chain = (*extending, path.resolve())
    if base_path in chain:
        raise SpecError(f"{path}: extends loops: {' -> '.join(str(p) for p in (*chain, base_path))}")
    base = _read_spec_data(base_path, chain)
    fields = data.pop("fields", None)
    merged = {**base, **data}
    if fields is not None:
        if not isinstance(fields, list):
            raise SpecError(f"{path}: fields is a list")
        own = [dict(field) if isinstance(field, dict) else field for field in base.get("fields") or []]
        by_name = {field.get("name"): field for field in own if isinstance(field, dict)}
        for field in fields:
            if isinstance(field, dict) and field.get("name") in by_name:
                folders = {**by_name[field["name"]].get(_FOLDERS, {}), **field.get(_FOLDERS, {})}
                by_name[field["name"]].update(field)
                by_name[field["name"]][_FOLDERS] = folders
            else:
                own.append(field)
        merged["fields"] = own
    return merged


def parse_spec_data(data: dict[str, Any], source: str = "<spec>", skip_fields: set[int] | None = None) -> ParseSpec:
    """The spec ``data`` describes; ``SpecError`` lists every problem (``skip_fields``: indices of fields
    whose problems were reported already) and carries what the later checks can still run on."""
    try:
        return ParseSpec.model_validate(data)
    except ValidationError as exc:
        skipped = skip_fields or set()
        described = _describe(exc, data)
        problems = [line for index, line in described if index not in skipped]
        # Spec-wide checks (ParseSpec._consistent) run only once every field is valid: they are made
        # here on the raw data too, so that a duplicate name or an unknown example field is not hidden
        # by a bad kind.
        problems += [problem for problem in _raw_consistency_problems(data) if problem not in problems]
        invalid = {index for index, _ in described if index is not None}
        partial = _partial_spec(data, exc.errors(), invalid | skipped)
        unchecked = _unchecked_values(data, invalid - skipped)
        raise SpecError.listing(source, problems, partial, unchecked) from None


def _raw_consistency_problems(data: dict[str, Any]) -> list[str]:
    """``consistency_problems`` of the raw data (the same words as ``ParseSpec._consistent``)."""
    fields = data.get("fields")
    if not isinstance(fields, list):
        return []
    names: list[str] = [f["name"] for f in fields if isinstance(f, dict) and isinstance(f.get("name"), str)]
    raw_examples = data.get("examples")
    examples = [
        (e.get("query"), list(e["parse"])) if isinstance(e, dict) and isinstance(e.get("parse"), dict) else (None, [])
        for e in (raw_examples if isinstance(raw_examples, list) else [])
    ]
    return consistency_problems(names, examples, data.get("core_fields"))


#: What a spec-wide value that has a problem (reported already) is replaced with in the partial spec.
_PLACEHOLDERS = {"name": "partial", "version": "0", "description": "-"}
_NO_EXAMPLE: dict[str, Any] = {"query": "-", "parse": {}}


def _partial_spec(data: dict[str, Any], errors: list[Any], left_out: set[int]) -> ParseSpec | None:
    """The spec without the fields ``left_out`` and those of a name two fields have (and their values in
    the examples), and with every other part that has a problem replaced by a harmless one (an
    example by an empty one, so that the others keep their index): what the checks that come after
    validation (the examples against the grammar) can still run on. None where that does not validate."""
    fields = data.get("fields")
    if not isinstance(fields, list):
        return None
    named = [raw.get("name") if isinstance(raw, dict) else None for raw in fields]
    kept: list[dict[str, Any]] = []
    names: set[str] = set()
    for index, (raw, name) in enumerate(zip(fields, named, strict=True)):
        if index not in left_out and isinstance(name, str) and named.count(name) == 1:
            names.add(name)
            kept.append(raw)
    if not kept:
        return None
    partial = {key: value for key, value in data.items() if key in ParseSpec.model_fields}
    partial["fields"] = kept
    for error in errors:
        loc = error["loc"]
        if len(loc) == 1 and loc[0] in _PLACEHOLDERS:
            partial[loc[0]] = _PLACEHOLDERS[loc[0]]
        elif len(loc) == 1 and loc[0] in ("instruction", "core_fields", "examples"):
            partial.pop(loc[0], None)
    if isinstance(partial.get("core_fields"), list):
        partial["core_fields"] = [name for name in partial["core_fields"] if name in names] or None
    if isinstance(partial.get("examples"), list):
        partial["examples"] = [_partial_example(example, names) for example in partial["examples"]]
    try:
        return ParseSpec.model_validate(partial)
    except ValidationError:
        return None


def _partial_example(raw: Any, names: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - {"query", "parse"}:
        return _NO_EXAMPLE
    query, parse = raw.get("query"), raw.get("parse")
    if not isinstance(query, str) or not 1 <= len(query) <= 256 or not isinstance(parse, dict):
        return _NO_EXAMPLE
    return {"query": query,
            "parse": {key: value for key, value in parse.items() if key in names and (value is None or
                                                                                     isinstance(value, str))}}


def _unchecked_values(data: dict[str, Any], invalid: set[int]) -> list[UncheckedValue]:
    """The examples' values for the ``invalid`` fields (whose files were read), with what each field
    lists, whatever its kind: values and their forms, mentions. None of a name two fields have."""
    fields, examples = data.get("fields"), data.get("examples")
    if not isinstance(fields, list) or not isinstance(examples, list):
        return []
    named = [raw.get("name") if isinstance(raw, dict) else None for raw in fields]
    known: dict[str, tuple[str, ...]] = {}
    for index in sorted(invalid):
        raw, name = (fields[index], named[index]) if index < len(fields) else (None, None)
        if not isinstance(raw, dict) or not isinstance(name, str) or named.count(name) != 1:
            continue
        values, mentions = raw.get("values"), raw.get("mentions")
        listed: list[Any] = list(mentions) if isinstance(mentions, list) else []
        for entry in values if isinstance(values, list) else []:
            if isinstance(entry, dict):
                forms = entry.get("forms")
                listed += [entry.get("value"), *(forms if isinstance(forms, list) else [])]
            else:
                listed.append(entry)
        known[name] = tuple(item for item in listed if isinstance(item, str))
    unchecked: list[UncheckedValue] = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or not isinstance(example.get("query"), str):
            continue
        parse = example.get("parse")
        for name, value in (parse.items() if isinstance(parse, dict) else ()):
            if name in known and isinstance(value, str):
                unchecked.append(UncheckedValue(index, example["query"], name, value, known[name]))
    return unchecked


def _path(loc: Any) -> str:
    """A location as the messages write it: ``fields[2].kind``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _field_where(index: int, raw: Any, loc: Any = ()) -> str:
    """How every problem names a field: by name, with where it is."""
    name = raw.get("name") if isinstance(raw, dict) else None
    path = _path(["fields", index, *loc])
    return f"field {name!r} ({path})" if isinstance(name, str) and name else path


def _describe(exc: ValidationError, data: dict[str, Any]) -> list[tuple[int | None, str]]:
    """Each problem with its location, naming a field by name and an example by its query rather than by
    index alone; with the index of the field it concerns (None for the rest of the spec)."""
    raw_fields, raw_examples = data.get("fields"), data.get("examples")
    fields: list[Any] = raw_fields if isinstance(raw_fields, list) else []
    examples: list[Any] = raw_examples if isinstance(raw_examples, list) else []
    lines: list[tuple[int | None, str]] = []
    for error in exc.errors():
        loc = list(error["loc"])
        index = None
        if len(loc) >= 2 and loc[0] == "fields" and isinstance(loc[1], int):
            index = loc[1]
            where = _field_where(index, fields[index] if index < len(fields) else None, loc[2:])
        elif len(loc) >= 2 and loc[0] == "examples" and isinstance(loc[1], int):
            raw = examples[loc[1]] if loc[1] < len(examples) else None
            where = _example_where(loc[1], raw.get("query") if isinstance(raw, dict) else None)
            if len(loc) == 4 and loc[2] == "parse" and isinstance(loc[3], str):
                where += f": field {loc[3]!r}"
            elif loc[2:]:
                where += f": {_path(loc[2:])}"
        else:
            where = _path(loc)
        messages = error["msg"].removeprefix("Value error, ").split("\n")
        if error["type"] == "string_type" and isinstance(error["input"], bool | int | float):
            key = loc[-1] if loc and isinstance(loc[-1], str) and loc[-1] != "str" else None
            messages = [unquoted_scalar(error["input"], key)]
        lines += [(index, f"{where}: {message}" if where else message) for message in messages]
    return lines


def _read_values(base: Path, name: str, option: str = "values_file") -> list[Any]:
    """A values file (YAML/JSON list, or text: a value a line, its forms after commas); a mentions or
    heads file is text, one phrase or word a line (commas belong to the phrase)."""
    path = (base / name).resolve()
    if not path.is_file():
        raise SpecError(f"{option} {name!r} not found (looked for {path})")
    text = path.read_text(encoding="utf-8")
    if option == "values_file" and path.suffix in (".yaml", ".yml", ".json"):
        values = yaml.safe_load(text)
        if not isinstance(values, list):
            raise SpecError(f"{option} {name!r} must hold a list of values")
        return values
    entries: list[Any] = []
    for line in text.splitlines():
        parts = [line.strip()] if option != "values_file" else [part.strip() for part in line.split(",")]
        if parts and parts[0] and not parts[0].startswith("#"):
            entries.append({"value": parts[0], "forms": [p for p in parts[1:] if p]})
    return entries


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec file format, for editors (``qustream spec schema``)."""
    schema = ParseSpec.model_json_schema()
    # A value may be written as a plain string when it has no other forms.
    values = schema["$defs"]["SpecField"]["properties"]["values"]
    values["items"] = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 80}, values["items"]]}
    # A spec that extends another gives only what it changes: each field by name, with its new options.
    definitions = schema.pop("$defs")
    definitions["SpecFieldChange"] = {**copy.deepcopy(definitions["SpecField"]), "required": ["name"]}
    extending = copy.deepcopy(schema)
    extending["properties"]["extends"] = {
        "type": "string", "minLength": 1,
        "description": "The spec this one changes: a built-in name or a YAML path relative to this file."}
    extending["properties"]["fields"] = {"type": "array", "items": {"$ref": "#/$defs/SpecFieldChange"}}
    extending["required"] = ["extends"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "qustream parse spec",
            "$defs": definitions, "anyOf": [schema, extending]}

"""Choose a field's ``null_bias`` on a trained model's held-out rows, not on the set you report.

Scores the model on the rows ``qustream train`` held out (the same seeded split, read from the
model's training report), under the catalog
without the mentions only those rows label (as training scored them), once per bias::

    python -m bench.null_bias_sweep --model <trained folder> --data /tmp/queryner_train_ecommerce.jsonl \\
        --field brand --biases 0,1,2,3,4 > null_bias_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from schemas.settings import Settings
from schemas.spec import ParseSpec
from workers.engine import ConstrainedEngine
from workers.evaluation import parse_cases, quality_case, score
from workers.grammar import load_checked_spec, spec_vocabulary
from workers.model import load_model
from workers.training import REPORT, read_labelled, split_records, without_own_mentions


def held_out_split(model: Path) -> tuple[int, int]:
    """The held-out size and seed the model was trained with, from its training report."""
    options = json.loads((model / REPORT).read_text())["options"]
    return int(options["held_out"]), int(options["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A folder `qustream train` wrote.")
    parser.add_argument("--data", type=Path, required=True, help="The labelled JSONL it was trained on.")
    parser.add_argument("--spec", default="ecommerce")
    parser.add_argument("--field", default="brand")
    parser.add_argument("--biases", default="0,1,2,3,4")
    args = parser.parse_args()
    held_out, seed = held_out_split(Path(args.model))
    spec = load_checked_spec(args.spec)
    vocabulary = spec_vocabulary(spec)
    records, _ = read_labelled(spec, vocabulary, args.data)
    train_records, held_records = split_records(records, held_out, seed)
    held = [record for _, record in held_records]
    settings = Settings(parse_spec=args.spec, model=args.model)
    loaded = load_model(settings, spec_fingerprint=spec.fingerprint)
    for bias in (float(b) for b in args.biases.split(",")):
        data = spec.model_dump(mode="json")
        next(f for f in data["fields"] if f["name"] == args.field)["null_bias"] = bias
        variant, _ = without_own_mentions(ParseSpec.model_validate(data), vocabulary, held,
                                          [record for _, record in train_records])
        cases = [quality_case(variant, record) for record in held]
        parses, flags, _ = parse_cases(ConstrainedEngine(settings, loaded, variant), cases)
        invented = sum(1 for case, parse in zip(cases, parses, strict=True)
                       if not case.expected.get(args.field) and (parse or {}).get(args.field) is not None)
        absent = sum(1 for case in cases if not case.expected.get(args.field))
        print(json.dumps({"model": args.model, "field": args.field, "null_bias": bias, "rows": len(cases),
                          f"{args.field}_invented": invented, f"{args.field}_absent": absent,
                          **score(variant, cases, parses, flags)}), flush=True)


if __name__ == "__main__":
    main()

"""Decoding speed with and without cuDNN's attention kernels, one fresh process per variant (a device
check: run on a CUDA machine; ``DEVICE=cpu`` runs it here as a smoke test).

    python -m bench.cuda_attention bf16 bfloat16 on    # PyTorch's choice: cuDNN attention allowed
    python -m bench.cuda_attention bf16_off bfloat16 off
    python -m bench.cuda_attention fp32 float32 on

Each process parses the spec's first ``N`` labelled queries (default 320, ecommerce) at batch 64 twice
with ``parse_batch`` (the first pass meets every shape for the first time, the second meets them again),
then once through ``submit`` (continuous batching), and prints one JSON line: queries per second of each,
and how many continuous parses differ from ``parse_batch``'s. ``load_model`` turns cuDNN attention off on
CUDA (``workers.model.avoid_cudnn_attention``); ``on`` here turns it back on after the load, as PyTorch
would have it. Results: bench/results/cuda_attention_h200.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable


def run(name: str, dtype: str, cudnn: bool, spec_name: str = "ecommerce", queries_count: int = 320,
        device: str = "cuda", batch_size: int = 64) -> dict[str, object]:
    import torch

    from schemas.settings import Settings
    from workers.engine import ConstrainedEngine
    from workers.evaluation import load_quality
    from workers.grammar import load_checked_spec
    from workers.model import load_model

    spec = load_checked_spec(spec_name)
    queries = [case.query for case in load_quality(spec)][:queries_count]
    settings = Settings(parse_spec=spec_name, device=device, dtype=dtype)
    engine = ConstrainedEngine(settings, load_model(settings, spec_fingerprint=spec.fingerprint), spec)
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    engine.warm_up()
    row: dict[str, object] = {"variant": name, "dtype": dtype, "cudnn_attention": cudnn, "queries": len(queries),
                              "batch_size": batch_size}
    parses: list[dict[str, str | None]] = []
    for label in ("first_pass_qps", "second_pass_qps"):
        sync()
        started = time.perf_counter()
        parses = []
        for start in range(0, len(queries), batch_size):
            parses += [result.parse for result in engine.parse_batch(queries[start : start + batch_size])]
        sync()
        row[label] = round(len(queries) / (time.perf_counter() - started), 2)
    started = time.perf_counter()
    continuous = [future.result(timeout=600).parse for future in [engine.submit(query) for query in queries]]
    row["continuous_qps"] = round(len(queries) / (time.perf_counter() - started), 2)
    row["continuous_differs"] = sum(a != b for a, b in zip(parses, continuous, strict=True))
    engine.close()
    return row


if __name__ == "__main__":
    variant, dtype_name, switch = sys.argv[1:4]
    print(json.dumps(run(variant, dtype_name, switch == "on", queries_count=int(os.environ.get("N", "320")),
                         device=os.environ.get("DEVICE", "cuda"))))

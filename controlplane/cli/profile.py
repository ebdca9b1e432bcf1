"""`ctl profile`: load-test one running instance and record its throughput for the planner."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import ExitCode, OutputFormat, OutputOpt, fail, run_async
from controlplane.cli.main import app
from controlplane.cli.output import print_json, print_table
from controlplane.planner.profile import DECODE_HEAVY, PREFILL_HEAVY, Mix, ProfileError, merge_profile, profile_instance
from controlplane.planner.snapshot import KNOWN_TP_DEGREES

EXAMPLE = """
Examples:

  # profile the vLLM instance on gpu-17 (one H100) and merge the result into the cluster file
  ctl profile --url http://gpu-17:8123 --model llama-3.1-8b --gpu-type H100 --tp 1 --out examples/cluster.yaml

  # a shorter, lighter run, printed as JSON only
  ctl profile --url http://127.0.0.1:8000 --model demo --gpu-type SIM-24GB --tp 1 --concurrency 4 --duration 6 -o json
"""


@app.command(epilog=EXAMPLE)
def profile(
    url: Annotated[str, typer.Option("--url", help="Base URL of a running OpenAI-compatible instance.")],
    model: Annotated[str, typer.Option("--model", help="Model name the instance serves.")],
    gpu_type: Annotated[str, typer.Option("--gpu-type", help="GPU type it runs on, as the cluster file names it.")],
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel degree of the instance.")],
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Concurrent streaming requests.")] = 8,
    duration: Annotated[float, typer.Option("--duration", min=0.5, help="Seconds in total (split over the "
                                            "prefill-heavy and decode-heavy mixes).")] = 20.0,
    prefill_words: Annotated[int, typer.Option("--prefill-prompt", min=1, help="Prompt length of the "
                                               "prefill-heavy mix (~tokens).")] = PREFILL_HEAVY.prompt_words,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", min=1, help="max_tokens of the decode-heavy "
                                               "mix.")] = DECODE_HEAVY.max_tokens,
    out: Annotated[Path | None, typer.Option("--out", help="Merge the profile entry into this YAML/JSON file's "
                                             "`profiles` list.")] = None,
    api_key: Annotated[str, typer.Option("--api-key", help="Bearer key when profiling through a gateway "
                                         "(default: $MODELPOOL_API_KEY).")] = "",
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Measure requests/s and tokens/s of one instance and write a planner profile entry.

    Prompts are sized to the engine's max_model_len (from /v1/models and /tokenize); a mix stops
    after 5 requests in a row are refused with a 4xx, and the command fails saying why.
    """
    if tp not in KNOWN_TP_DEGREES:
        fail(f"--tp must be one of {list(KNOWN_TP_DEGREES)}, got {tp}", ExitCode.USAGE)
    mixes = (Mix(PREFILL_HEAVY.name, prefill_words, PREFILL_HEAVY.max_tokens),
             Mix(DECODE_HEAVY.name, DECODE_HEAVY.prompt_words, decode_tokens))
    key = api_key or os.environ.get("MODELPOOL_API_KEY", "")
    try:
        result = run_async(lambda: profile_instance(url, model, gpu_type, tp, concurrency=concurrency,
                                                    duration_s=duration, mixes=mixes, api_key=key))
        if out is not None:
            merge_profile(out, result.entry)
    except ProfileError as exc:
        fail(str(exc))
    if output is OutputFormat.json:
        print_json({**result.as_dict(), "written_to": str(out) if out else None})
        return
    print_table(["mix", "requests", "errors", "req/s", "tokens/s", "ttft p50 ms"],
                [(m["mix"], m["requests"], m["errors"], m["requests_per_s"], m["tokens_per_s"], m["ttft_p50_ms"])
                 for m in (r.as_dict() for r in result.mixes)], title=f"Profile of {model} at {url}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    e = result.entry
    print(f"profile: {{model: {e.model}, gpu_type: {e.gpu_type}, tp: {e.tp}, requests_per_s: {e.requests_per_s}}}"
          + (f" -> merged into {out}" if out else ""))

"""ops/Dockerfile, checked statically (no Docker here): the image installs the extras that
pyproject.toml defines (one build variant per runtime extra), copies every package the project
ships, and is multi-stage, pinned, unprivileged, with `ctl` as its entrypoint."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "ops" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Extras for working on modelpool, not for running it: never in the image.
NOT_IN_IMAGE = {"dev", "bench"}


def variant_extras(text: str) -> dict[str, set[str]]:
    """VARIANT -> extras, from the ``case "$VARIANT" in name) extras="[a,b]" ;;`` block."""
    out: dict[str, set[str]] = {}
    for name, extras in re.findall(r'^\s*([a-z0-9-]+)\)\s*extras="([^"]*)"\s*;;', text, flags=re.MULTILINE):
        out[name] = {e.strip() for e in extras.strip("[]").split(",") if e.strip()}
    return out


def test_each_runtime_extra_has_a_variant_and_no_variant_invents_one() -> None:
    defined = set(PYPROJECT["project"]["optional-dependencies"])
    variants = variant_extras(DOCKERFILE)
    assert "base" in variants and variants["base"] == set()
    installed = set().union(*variants.values())
    assert installed == defined - NOT_IN_IMAGE, (installed, defined)
    default = re.search(r"^ARG VARIANT=(\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert default is not None and default.group(1) in variants
    assert 'pip install "/src${extras}"' in DOCKERFILE  # the variant's extras are what gets installed


def test_the_extras_parser_can_fail() -> None:
    assert variant_extras('  base) extras="" ;;\n  gpu) extras="[vllm,sglang]" ;;\n') == {
        "base": set(), "gpu": {"vllm", "sglang"}}


def test_every_shipped_package_is_copied() -> None:
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) \./", DOCKERFILE, flags=re.MULTILINE))
    for pattern in includes:
        assert pattern.rstrip("*") in copied, pattern
    assert "pyproject.toml" in DOCKERFILE and "proto" in copied  # protogen's source travels too
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for package in [p.rstrip("*") for p in includes]:
        assert f"!{package}/" in ignore


def test_multi_stage_pinned_non_root_ctl_entrypoint() -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert base is not None
    image = base.group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
    python = re.match(r"python:(\d+\.\d+)", image)
    assert python is not None
    assert float(python.group(1)) >= float(PYPROJECT["project"]["requires-python"].lstrip(">="))
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert len(stages) >= 2 and all(s == "${PYTHON_IMAGE}" for s in stages)
    assert "COPY --from=build /opt/modelpool /opt/modelpool" in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["ctl"\]', DOCKERFILE, flags=re.MULTILINE)

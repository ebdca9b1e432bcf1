"""A tiny local Llama for a real vLLM on CPU: config.json + a tokenizer trained here; no weights.

    python bench/tiny_model.py DIR                  # write the model directory (idempotent)
    python bench/tiny_model.py --smoke DIR --venv V # serve it with V's vLLM once and ask it a question

vLLM serves the directory with ``--load-format dummy`` (random weights), so nothing is downloaded:
the architecture comes from config.json (Llama, hidden 256, 2 layers, 4 heads of 64, vocab 1024),
the tokenizer is a byte-level BPE trained in ~2 s on a seeded synthetic corpus, and its
tokenizer_config.json carries a chat template (vLLM's chat endpoint needs one). Answers are
nonsense but deterministic at temperature 0, which is all a routing test needs.

Run by bench/real_vllm.sh with the vLLM venv's python (it has ``tokenizers``); the test
tests/real_engine/ imports ``VLLM_SERVE_ARGS`` and ``VLLM_ENV`` so both serve it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HIDDEN = 256
LAYERS = 2
HEAD_DIM = 64
VOCAB = 1024
MAX_LEN = 1024
SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
    "intermediate_size": 4 * HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HIDDEN // HEAD_DIM,
    "num_key_value_heads": HIDDEN // HEAD_DIM, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
    "max_position_embeddings": MAX_LEN, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
}
# Flags for `vllm serve DIR` (the served name and port come from the caller).
VLLM_SERVE_ARGS = ["--load-format", "dummy", "--max-model-len", str(MAX_LEN), "--max-num-seqs", "8",
                   "--dtype", "float32"]
# vLLM's CPU backend reserves its KV cache up front (default 4 GiB); 1 GiB is plenty for this model.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

_WORDS_TEXT = (
    "the a pool of idle gpus serves one endpoint model request token stream gateway agent planner "
    "etcd lease node job slurm queue drain ready starting failed instance engine cache prompt answer "
    "user assistant system hello world what is how many why when where who which time day night "
    "cluster memory compute fast slow small large open close send receive wait run stop start plan "
    "apply red green blue one two three four five six seven eight nine ten and or not to in on at by "
    "for with from is are was were be been has have had do does did can could will would should may "
)
_WORDS = _WORDS_TEXT.split()


def corpus(lines: int = 4000, seed: int = 1234) -> list[str]:
    """Seeded synthetic sentences (the tokenizer only needs a stable, varied text to learn merges)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]) + f" {rng.randint(0, 999)}")
    return out


def write_model(directory: Path) -> bool:
    """Write config, generation config and tokenizer files; False when already there and identical."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(CONFIG, indent=2, sort_keys=True) + "\n"
    config_path = directory / "config.json"
    if (config_path.exists() and config_path.read_text() == config_text
            and (directory / "tokenizer.json").exists() and (directory / "tokenizer_config.json").exists()):
        return False
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() > VOCAB:
        raise SystemExit(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {VOCAB}")
    tokenizer.save(str(directory / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "</s>", "unk_token": None, "model_max_length": MAX_LEN, "clean_up_tokenization_spaces":
                  False, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    config_path.write_text(config_text)  # last: its presence marks a complete directory
    return True


def vllm_command(venv: Path) -> list[str]:
    """``vllm`` from the venv, or ``python -m vllm.entrypoints.openai.api_server`` when it has none."""
    binary = venv / "bin" / "vllm"
    if binary.exists():
        return [str(binary), "serve"]
    return [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, body: dict[str, object] | None = None, timeout: float = 120.0) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (vLLM runs an engine-core child), in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def smoke(directory: Path, venv: Path, ready_timeout_s: float = 900.0) -> None:
    """Serve the model once, time readiness, ask one chat question at temperature 0, stop."""
    port = _free_port()
    argv = [*vllm_command(venv), str(directory), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "tiny", *VLLM_SERVE_ARGS]
    log_path = directory.parent / "smoke-vllm.log"
    print(f"tiny_model: {' '.join(argv)}  (log: {log_path})", flush=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = started + ready_timeout_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"vllm exited with {proc.returncode} before ready:\n{tail}")
            if time.monotonic() > deadline:
                raise SystemExit(f"vllm not ready after {ready_timeout_s:.0f}s (see {log_path})")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        ready_s = time.monotonic() - started
        models = _get(f"{base}/v1/models")
        t = time.monotonic()
        answer = _get(f"{base}/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "hello pool"}], "max_tokens": 16,
            "temperature": 0})
        chat_s = time.monotonic() - t
        card = models["data"][0]  # type: ignore[index]
        text = answer["choices"][0]["message"]["content"]  # type: ignore[index]
        print(f"tiny_model: ready in {ready_s:.1f}s, RSS {_rss_mib(proc.pid):.0f} MiB, "
              f"max_model_len={card.get('max_model_len')}, chat 16 tokens in {chat_s:.2f}s: {text!r}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--smoke", action="store_true", help="serve it once with --venv's vLLM")
    parser.add_argument("--venv", type=Path, help="the vLLM venv (for --smoke)")
    args = parser.parse_args()
    if args.smoke:
        if args.venv is None:
            parser.error("--smoke needs --venv")
        smoke(args.directory, args.venv)
        return
    wrote = write_model(args.directory)
    print(f"tiny_model: {'wrote' if wrote else 'kept'} {args.directory}", file=sys.stderr)


if __name__ == "__main__":
    main()

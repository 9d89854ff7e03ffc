"""`jpaged` CLI: generate prints only the completion; bad input is one error line and a non-zero exit."""
import os
import subprocess
import sys

import pytest

from jpaged.loader import load_model
from tests.hf_reference import hf_greedy, tiny_hf_model
from tests.loader.helpers import write_gguf, write_hf_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jpaged", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def assert_one_line_error(proc, *needles, progress_lines=False):
    """Exit != 0, no traceback, stdout empty, and exactly one stderr line (besides `jpaged: ` progress logs
    when `progress_lines`) that contains every needle."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    if progress_lines:
        lines = [line for line in lines if not line.startswith("jpaged: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_model("llama3", seed=11)
    hf.save_pretrained(path)
    write_hf_tokenizer(path)
    return hf, path


def test_generate_prints_only_the_greedy_completion(tiny_dir):
    hf, path = tiny_dir
    proc = run_cli("generate", "--model", str(path), "--max-tokens", "12", "Hello world")
    assert proc.returncode == 0, proc.stderr
    _, tok = load_model(str(path))
    ids = tok.encode("Hello world")
    expected = hf_greedy(hf, ids, 12)
    if 2 in expected:  # the CLI stops at </s>
        expected = expected[: expected.index(2)]
    assert proc.stdout == tok.decode(expected) + "\n"


def test_missing_model_path(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "hi"), "not found")


def test_serve_with_missing_model_is_one_error_line(tmp_path):
    assert_one_line_error(run_cli("serve", "--model", str(tmp_path / "nope"), "--port", "0"), "not found")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "hi"), "unsupported architecture")


def test_corrupt_safetensors(tiny_dir, tmp_path):
    _, path = tiny_dir
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(os.urandom(256))
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "hi"), "safetensors")


def test_corrupt_gguf(tmp_path):
    write_gguf(tiny_hf_model("qwen3"), tmp_path / "m.gguf", "qwen3")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[:24] + os.urandom(len(data) - 24))
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "m.gguf"), "hi"), "GGUF")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(prompt):
    assert_one_line_error(run_cli("generate", prompt), "PROMPT must be non-empty")


def test_no_prompt_is_one_usage_line():
    assert_one_line_error(run_cli("generate"), "required")


def test_convert_to_existing_destination(tiny_dir, tmp_path):
    _, path = tiny_dir
    (tmp_path / "x").write_text("")
    assert_one_line_error(run_cli("convert", str(path), str(tmp_path / "x")), "already exists")

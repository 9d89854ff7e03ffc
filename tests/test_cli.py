"""`jpaged` CLI: generate prints only the completion; bad input is one error line and a non-zero exit."""
import dataclasses
import os
import subprocess
import sys

import pytest

from jpaged import cli
from jpaged.cli import SEPARATOR
from jpaged.config import EngineConfig
from jpaged.loader import load_model
from jpaged.server.cli_args import server_settings
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


def test_several_prompts_print_their_completions_apart_and_no_progress_bar_off_a_terminal(tiny_dir):
    hf, path = tiny_dir
    prompts = ["Hello world", "The cat"]
    proc = run_cli("generate", "--model", str(path), "--max-tokens", "6", *prompts)
    assert proc.returncode == 0, proc.stderr
    _, tok = load_model(str(path))
    texts = []
    for prompt in prompts:
        expected = hf_greedy(hf, tok.encode(prompt), 6)
        texts.append(tok.decode(expected[: expected.index(2)] if 2 in expected else expected))
    assert proc.stdout == f"{texts[0]}\n{SEPARATOR}\n{texts[1]}\n"
    assert "Generating" not in proc.stderr  # stderr is a pipe here, not a terminal


def test_serve_without_the_server_packages_names_the_install(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SERVER_MODULES", ("jpaged_no_such_module",))
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jpaged_no_such_module" in err and "pip install 'jpaged[serve]'" in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("generate", "serve", "convert", "bench"))


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_engine_flags_are_engine_config_fields_with_its_defaults(command):
    args = cli.build_parser().parse_args([command] + (["hi"] if command == "generate" else []))
    fields = [f for f in dataclasses.fields(EngineConfig) if not (command == "generate" and f.name == "seed")]
    assert {f.name: getattr(args, f.name) for f in fields} == {f.name: f.default for f in fields}
    assert args.dtype == "auto"
    assert cli.build_parser().parse_args(["serve", "--no-prefix-caching"]).enable_prefix_caching is False


def test_an_unsupported_dtype_is_a_usage_error():
    proc = run_cli("generate", "--dtype", "float16", "hi")
    assert proc.returncode == 2 and "--dtype" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_flags_reach_the_server():
    args = cli.build_parser().parse_args(["serve", "--port", "9", "--api-key", "k", "--max-n", "3"])
    settings = server_settings(args)
    assert (settings.port, settings.api_key, settings.max_n, settings.host) == (9, "k", 3, "127.0.0.1")
    assert settings.warmup and not server_settings(cli.build_parser().parse_args(["serve", "--no-warmup"])).warmup

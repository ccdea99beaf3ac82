"""Fine-tuning a causal language model on chat pairs: LoRA (peft) or all weights, on the CPU or a CUDA device.

Plain Python, no Django. Hyperparameter validation needs nothing beyond the standard library (the web process
checks a request with it); training imports torch, transformers and peft inside its functions, which the
`convert` install extra provides. Nothing here downloads anything: the weights come from a local GGUF file or
Hugging Face folder, the tokenizer and chat template from the base artifact's folder.

A training example is a conversation (the evaluation prompt's messages for one dataset item) and the answer the
model should give. Both are tokenised exactly as the inference engine tokenises them (workers/engine/chat.py):
the prompt tokens are the tokens the engine feeds the model, and only the reply's tokens (answer plus the chat
template's end of turn) count in the loss. So a fine-tune learns to continue the very prompts it is evaluated on.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bumped whenever training changes what a given spec produces, so an old succeeded job is not reused for it.
TRAINING_VERSION = 1

METHODS = ("lora", "full")
# Tokenizer and config files the merged model folder takes from the base artifact's folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Loss before and after training is measured on at most this many training examples (the same ones both times).
LOSS_PROBE_EXAMPLES = 32


class TrainingError(RuntimeError):
    """Training cannot go ahead or failed; the message says why."""


class TrainingUnavailable(TrainingError):
    """torch, transformers or peft is not installed in this process."""


class TrainingCancelled(Exception):  # noqa: N818 - a request, not an error
    """Raised by a step callback to stop training; nothing is saved."""


class HyperparameterError(ValueError):
    """A hyperparameter set that cannot be trained with; the message names the key and the rule."""


# --- hyperparameters -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    kind: str  # "int", "float" or "names"
    help: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low bound itself is not allowed
    high_open: bool = False
    methods: tuple[str, ...] = METHODS
    defaults_by_method: Mapping[str, Any] = field(default_factory=dict)

    def default_for(self, method: str) -> Any:
        return self.defaults_by_method.get(method, self.default)


PARAMS: dict[str, Param] = {
    "steps": Param("int", "optimiser steps (give steps or epochs, not both)", None, 1, 100_000),
    "epochs": Param("float", "passes over the training data (instead of steps)", None, 0, 1000, low_open=True),
    "batch_size": Param("int", "examples per optimiser step", 8, 1, 1024),
    "learning_rate": Param(
        "float", "AdamW learning rate", None, 0, 1, low_open=True, defaults_by_method={"lora": 2e-4, "full": 2e-5}
    ),
    "warmup_steps": Param("int", "steps of linear warm-up before the linear decay", 0, 0, 100_000),
    "weight_decay": Param("float", "AdamW weight decay", 0.0, 0, 1),
    "max_grad_norm": Param("float", "gradient clipping norm", 1.0, 0, 1e6, low_open=True),
    "max_length": Param("int", "tokens per example; longer prompts lose their beginning", 512, 8, 32_768),
    "lora_r": Param("int", "LoRA rank", 8, 1, 1024, methods=("lora",)),
    "lora_alpha": Param(
        "int", "LoRA scaling alpha (the adapter is scaled by alpha / r)", 16, 1, 100_000, methods=("lora",)
    ),
    "lora_dropout": Param("float", "dropout on the LoRA input", 0.05, 0, 1, high_open=True, methods=("lora",)),
    "target_modules": Param(
        "names", "module names LoRA adapts, e.g. q_proj, v_proj", ("q_proj", "v_proj"), methods=("lora",)
    ),
}
DEFAULT_STEPS = 50
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")


def validate_hyperparameters(method: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The complete hyperparameter set for `method`: `raw` checked, defaults filled in.

    Unknown keys, keys of the other method, wrong types and out-of-range values raise HyperparameterError
    naming the key. Giving both `steps` and `epochs` is an error; giving neither means 50 steps.
    """
    if method not in METHODS:
        raise HyperparameterError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise HyperparameterError("hyperparameters must be a JSON object")
    unknown = sorted(str(k) for k in raw if k not in PARAMS)
    if unknown:
        allowed = ", ".join(k for k, p in PARAMS.items() if method in p.methods)
        raise HyperparameterError(f"unknown hyperparameter(s) {', '.join(unknown)}; {method} takes: {allowed}")
    foreign = sorted(k for k in raw if method not in PARAMS[k].methods)
    if foreign:
        raise HyperparameterError(f"{', '.join(foreign)} apply to LoRA only, not to method {method!r}")
    if "steps" in raw and "epochs" in raw:
        raise HyperparameterError("give steps or epochs, not both")
    out: dict[str, Any] = {}
    for key, param in PARAMS.items():
        if method not in param.methods:
            continue
        if key in raw:
            out[key] = _check(key, param, raw[key])
        elif param.default_for(method) is not None:
            default = param.default_for(method)
            out[key] = list(default) if isinstance(default, tuple) else default
    if "steps" not in out and "epochs" not in out:
        out["steps"] = DEFAULT_STEPS
    if out.get("warmup_steps", 0) and "steps" in out and out["warmup_steps"] >= out["steps"]:
        raise HyperparameterError(f"warmup_steps ({out['warmup_steps']}) must be fewer than steps ({out['steps']})")
    return out


def _check(key: str, param: Param, value: Any) -> Any:
    if param.kind == "names":
        if not isinstance(value, list) or not value or len(value) > 64:
            raise HyperparameterError(f"{key} must be a list of 1 to 64 module names, e.g. ['q_proj', 'v_proj']")
        bad = [v for v in value if not isinstance(v, str) or not _MODULE_NAME.fullmatch(v)]
        if bad:
            raise HyperparameterError(f"{key}: {bad[0]!r} is not a module name (letters, digits, '_' and '.')")
        return sorted(set(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HyperparameterError(f"{key} must be a number, not {type(value).__name__} {value!r}")
    if param.kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise HyperparameterError(f"{key} must be a whole number, not {value!r}")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise HyperparameterError(f"{key} must be a finite number")
    low, high = param.low, param.high
    if low is not None and (value < low or (param.low_open and value == low)):
        raise HyperparameterError(f"{key} must be {'>' if param.low_open else '>='} {low:g}, not {value!r}")
    if high is not None and (value > high or (param.high_open and value == high)):
        raise HyperparameterError(f"{key} must be {'<' if param.high_open else '<='} {high:g}, not {value!r}")
    return value


def total_steps(hyperparameters: Mapping[str, Any], examples: int) -> int:
    """Optimiser steps a validated hyperparameter set asks for on `examples` training examples."""
    if "steps" in hyperparameters:
        return int(hyperparameters["steps"])
    return max(1, math.ceil(float(hyperparameters["epochs"]) * examples / int(hyperparameters["batch_size"])))


# --- examples ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One chat pair: the prompt's messages for an item, and the answer the model should give."""

    messages: list[dict[str, str]]
    answer: str


@dataclass
class Tokenised:
    input_ids: list[int]
    labels: list[int]  # -100 where the token is prompt (not scored)


IGNORE = -100


def tokenise(tokenizer_folder: Path, examples: Sequence[Example], max_length: int) -> list[Tokenised]:
    """Prompt tokens exactly as the engine encodes them, then the reply's tokens; only the reply is scored.

    An example longer than `max_length` loses the beginning of its prompt (the reply is kept whole when it fits).
    """
    from .engine.chat import ChatTokenizer

    chat = ChatTokenizer.from_folder(tokenizer_folder)
    out = []
    for number, example in enumerate(examples, start=1):
        prompt = chat.encode(chat.render(example.messages))
        reply = chat.encode(chat.render_reply(example.messages, example.answer))
        if not reply:
            raise TrainingError(f"training example {number} has an empty answer")
        reply = reply[:max_length]
        prompt = prompt[max(0, len(prompt) - (max_length - len(reply))) :] if len(reply) < max_length else []
        out.append(Tokenised(input_ids=prompt + reply, labels=[IGNORE] * len(prompt) + reply))
    return out


# --- training ------------------------------------------------------------------------------------------------------

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Source:
    """Trainable weights: a GGUF file (de-quantised to float32 on load) or a Hugging Face folder."""

    kind: str  # "gguf" or "hf"
    path: Path


@dataclass
class TrainResult:
    steps: int
    examples: int
    device: str
    training_seconds: float  # the optimiser loop only: the device time training took
    initial_loss: float  # mean reply-token loss over the probe examples before training
    final_loss: float  # the same after training
    losses: list[list[float]]  # [step, loss of that step's batch]
    trainable_parameters: int
    load_seconds: float
    save_seconds: float


def require_training_libraries() -> None:
    """TrainingUnavailable unless torch, transformers and peft import."""
    missing = []
    for module in ("torch", "transformers", "peft"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TrainingUnavailable(
            f"fine-tuning needs {', '.join(missing)}, which this worker lacks: install the convert extra "
            "(pip install -e '.[convert]') on the machines that consume the training queue"
        )


def pick_device(wanted: str = "auto") -> str:
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise TrainingError("FULCRUM_TRAIN_DEVICE=cuda but torch sees no CUDA device")
    if wanted == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(source: Source) -> Any:
    """The float32 causal LM from a GGUF file or a Hugging Face folder (local files only)."""
    import torch
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        if not source.path.is_file():
            raise TrainingError(f"the base's GGUF file {source.path} is missing")
        return AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, local_files_only=True, dtype=torch.float32
        )
    if source.kind == "hf":
        if not (source.path / "config.json").is_file():
            raise TrainingError(f"the base's Hugging Face folder {source.path} is missing or has no config.json")
        return AutoModelForCausalLM.from_pretrained(str(source.path), local_files_only=True, dtype=torch.float32)
    raise TrainingError(f"cannot train from a {source.kind!r} source")


def train(
    source: Source,
    tokenizer_folder: Path,
    examples: Sequence[Example],
    *,
    method: str,
    hyperparameters: Mapping[str, Any],
    seed: int,
    out_dir: Path,
    on_step: StepCallback | None = None,
    device: str = "auto",
    threads: int = 0,
    log: Callable[[str], None] = lambda _m: None,
) -> TrainResult:
    """Train, merge a LoRA adapter into the weights, and save the model with the base's tokenizer in `out_dir`.

    `on_step(step, total, loss)` runs after every optimiser step; raising TrainingCancelled there stops training
    before anything is saved. Seeded: the same inputs give the same weights on the same device and library
    versions.
    """
    require_training_libraries()
    import torch

    hp = validate_hyperparameters(method, hyperparameters)
    if not examples:
        raise TrainingError("no training examples")
    if threads > 0:
        torch.set_num_threads(threads)
    device = pick_device(device)
    torch.manual_seed(seed)
    data = tokenise(tokenizer_folder, examples, int(hp["max_length"]))
    steps = total_steps(hp, len(data))

    started = time.monotonic()
    model = load_model(source)
    pad_id = _pad_id(model, tokenizer_folder)
    if method == "lora":
        model = _with_lora(model, hp, seed)
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    model.to(device)
    load_seconds = time.monotonic() - started
    log(f"loaded {source.kind} weights in {load_seconds:.1f}s; {len(data)} examples, {steps} steps on {device}")

    probe = data[:LOSS_PROBE_EXAMPLES]
    batch_size = int(hp["batch_size"])
    initial_loss = _mean_loss(model, probe, pad_id, batch_size, device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=float(hp["learning_rate"]), weight_decay=float(hp["weight_decay"]))
    warmup = int(hp.get("warmup_steps", 0))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(s, warmup, steps))
    order = _batches(len(data), batch_size, seed)
    losses: list[list[float]] = []
    model.train()
    loop_started = time.monotonic()
    for step in range(1, steps + 1):
        summed, scored = _loss_sum(model, _collate([data[i] for i in next(order)], pad_id, device))
        loss = summed / max(scored, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, float(hp["max_grad_norm"]))
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {step}: lower the learning rate")
        losses.append([step, round(value, 5)])
        if on_step is not None:
            on_step(step, steps, value)  # may raise TrainingCancelled
    training_seconds = time.monotonic() - loop_started

    model.eval()
    final_loss = _mean_loss(model, probe, pad_id, batch_size, device)
    saved = time.monotonic()
    if method == "lora":
        model = model.merge_and_unload()
    model.to("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(tokenizer_folder / name, out_dir / name)
    return TrainResult(
        steps=steps,
        examples=len(data),
        device=device,
        training_seconds=round(training_seconds, 3),
        initial_loss=round(initial_loss, 5),
        final_loss=round(final_loss, 5),
        losses=losses,
        trainable_parameters=sum(p.numel() for p in trainable),
        load_seconds=round(load_seconds, 3),
        save_seconds=round(time.monotonic() - saved, 3),
    )


def _with_lora(model: Any, hp: Mapping[str, Any], seed: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [t for t in hp["target_modules"] if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
        )
        raise TrainingError(
            f"target_modules {missing} are not modules of this model; its linear layers are: {', '.join(linear)}"
        )
    torch.manual_seed(seed)  # the adapter's initial weights
    config = LoraConfig(
        r=int(hp["lora_r"]),
        lora_alpha=int(hp["lora_alpha"]),
        lora_dropout=float(hp["lora_dropout"]),
        target_modules=list(hp["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _pad_id(model: Any, tokenizer_folder: Path) -> int:
    from .engine.chat import ChatTokenizer

    pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0:
        return pad
    return ChatTokenizer.from_folder(tokenizer_folder).pad_id


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the full rate, then linear decay towards zero at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    remaining = max(1, total - warmup)
    return max(0.0, 1.0 - (step - warmup) / remaining)


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Example indices in seeded shuffled passes; a batch may span the end of one pass and the start of the next."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(n, generator=generator).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _collate(rows: Sequence[Tokenised], pad_id: int, device: str) -> dict[str, Any]:
    """A left-padded batch with position ids that skip the padding (as the engine numbers positions).

    Left padding puts every row's reply at the end, so the logits are computed for the last `keep` positions
    only: the vocabulary projection of the prompt positions, which nothing is scored on, is skipped.
    """
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, width - n :] = torch.tensor(row.input_ids)
        labels[i, width - n :] = torch.tensor(row.labels)
        mask[i, width - n :] = 1
    scored = max(sum(1 for t in r.labels if t != IGNORE) for r in rows)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
        "labels": labels.to(device),
        "keep": min(width, scored + 1),
    }


def _loss_sum(model: Any, batch: Mapping[str, Any]) -> tuple[Any, int]:
    """(summed cross-entropy over the scored tokens, their count) for one collated batch."""
    import torch

    keep = int(batch["keep"])
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=keep,
    )
    logits = out.logits[:, -keep:]
    targets = batch["labels"][:, batch["labels"].shape[1] - keep + 1 :]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def _mean_loss(model: Any, rows: Sequence[Tokenised], pad_id: int, batch_size: int, device: str) -> float:
    """Mean loss per scored (reply) token over `rows`, dropout off."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            loss, n = _loss_sum(model, _collate(rows[start : start + batch_size], pad_id, device))
            total += float(loss)
            count += n
    if was_training:
        model.train()
    return total / max(count, 1)

"""Batched generation with a KV cache and shared-prefix parallel sampling.

For N samples of one prompt the prompt is run through the model once; its KV cache is then replicated N ways and
the N streams decode as one batch. Several prompts decode together (left-padded, with position ids and an
attention mask that ignore the padding), and streams that finish are dropped from the batch so they stop
costing work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .chat import ChatTokenizer
from .runtime import create_session
from .sampling import choose_tokens, log_softmax_at

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int = 0
    # Benchmarks set this so every variant generates exactly max_new_tokens.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    mean_logprob: float
    finish_reason: str  # "stop" (end-of-sequence token) or "length"


@dataclass
class Generation:
    samples: list[Sample]
    prompt_tokens: int
    latency_s: float = 0.0  # from the start of the batch until this input's last sample finished
    ttft_s: float = 0.0  # time to first token (the batch's prefill and first draw)

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    @property
    def time_per_output_token_s(self) -> float:
        """Decode time per token of the longest sample (the samples decode side by side)."""
        longest = max((len(s.token_ids) for s in self.samples), default=0)
        return max(0.0, self.latency_s - self.ttft_s) / (longest - 1) if longest > 1 else 0.0


@dataclass
class BatchStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    tokens: int = 0
    rows_per_step: list[int] = field(default_factory=list)


class Engine:
    """One ONNX decoder with its tokenizer. Build it once per process; `generate` is not thread-safe."""

    def __init__(
        self,
        folder: Path | str,
        *,
        provider: str = "auto",
        threads: int = 0,
        max_rows: int = 0,
        io_binding: bool | None = None,
        spin: bool = True,
    ):
        self.folder = Path(folder)
        self.tokenizer = ChatTokenizer.from_folder(self.folder)
        self.session, self.provider = create_session(self.folder / "model.onnx", provider, threads, spin)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._kv_names = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.endswith(".value")),
        )
        if not self._kv_names or "input_ids" not in inputs or "attention_mask" not in inputs:
            raise ValueError(f"{self.folder / 'model.onnx'} is not a decoder exported with a KV cache")
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._kv_names]
        self._has_position_ids = "position_ids" in inputs
        shape = inputs[self._kv_names[0]].shape
        self._kv_heads, self._head_dim = int(shape[1]), int(shape[3])
        self._kv_dtype = np.float16 if "float16" in inputs[self._kv_names[0]].type else np.float32
        self.max_rows = max_rows or self._default_max_rows()
        # With IO binding the KV cache stays in ONNX Runtime's own buffers between steps (on the GPU under
        # CUDA): each step's present tensors are bound as the next step's past without a trip through host
        # memory. On the CPU it measured no faster than plain runs, so it is the default on CUDA only.
        self.io_binding = self.provider == "cuda" if io_binding is None else io_binding
        self._device = "cuda" if self.provider == "cuda" else "cpu"
        self.last_stats = BatchStats()

    MIN_SHARED_PREFIX = 8

    def _default_max_rows(self) -> int:
        """Rows decoded together: wide enough to amortise each step's weight reads, small enough that the KV
        cache of a long generation stays within a fixed budget (1 GiB on CPU, 8 GiB on a GPU)."""
        bytes_per_token = len(self._kv_names) * self._kv_heads * self._head_dim * np.dtype(self._kv_dtype).itemsize
        budget = (8 if self.provider == "cuda" else 1) * 2**30
        by_memory = budget // (bytes_per_token * 2048)  # a row of 2k tokens of context
        return int(max(8, min(256 if self.provider == "cuda" else 64, by_memory)))

    # -- public API --------------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.render(messages)

    def generate_chat(
        self,
        conversations: Sequence[list[dict[str, str]]],
        params: SamplingParams,
        *,
        seeds: Sequence[int] = (),
    ) -> list[Generation]:
        return self.generate([self.render(c) for c in conversations], params, seeds=seeds)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, seeds: Sequence[int] = ()
    ) -> list[Generation]:
        """N samples for each prompt (already chat-formatted text), in the order given.

        `seeds` gives each prompt its own random stream (default: its position), so an input's samples are the
        same whichever other inputs share its batch.
        """
        encoded = [self.tokenizer.encode(p) for p in prompts]
        return self.generate_ids(encoded, params, seeds=seeds)

    def generate_ids(
        self, prompts: Sequence[list[int]], params: SamplingParams, *, seeds: Sequence[int] = ()
    ) -> list[Generation]:
        if seeds and len(seeds) != len(prompts):
            raise ValueError("give one seed per prompt")
        if any(not p for p in prompts):
            raise ValueError("a prompt encoded to no tokens")
        item_seeds = list(seeds) if seeds else list(range(len(prompts)))
        per_batch = max(1, self.max_rows // params.n)
        # Similar lengths together waste less work on padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        self.last_stats = BatchStats()
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            outs = self._generate_batch([prompts[i] for i in chunk], [item_seeds[i] for i in chunk], params)
            for i, out in zip(chunk, outs, strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    # -- the decoding loop ---------------------------------------------------------------------------------------

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(["logits", *self._present_names], feed)  # type: ignore[no-any-return]

    def _prefill(self, prompts: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray], IntArray, IntArray]:
        """Run every distinct prompt once; return (logits, KV cache, attention mask, position ids).

        Prompts of one batch usually share a long head (system message, few-shot examples): that head runs once
        and its cache is copied to every row, then only the differing tails run, left-padded after the head.
        """
        batch = len(prompts)
        shared = _common_prefix(prompts) if batch > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # each row keeps a tail to produce its logits
        if shared < self.MIN_SHARED_PREFIX:
            shared = 0
        cache: list[Any] = [np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)] * len(
            self._kv_names
        )
        head_mask = np.ones((batch, shared), dtype=np.int64)
        if shared:
            head = np.asarray([prompts[0][:shared]], dtype=np.int64)
            _, cache = self._forward(head, np.ones_like(head), np.arange(shared, dtype=np.int64)[None, :], cache)
        cache = [np.repeat(_host(c), batch, axis=0) for c in cache] if batch > 1 else cache
        tails = [p[shared:] for p in prompts]
        width = max(len(t) for t in tails)
        ids = np.full((batch, width), self.tokenizer.pad_id, dtype=np.int64)
        tail_mask = np.zeros((batch, width), dtype=np.int64)
        for row, tail in enumerate(tails):
            ids[row, width - len(tail) :] = tail
            tail_mask[row, width - len(tail) :] = 1
        mask = np.concatenate([head_mask, tail_mask], axis=1)
        positions = shared + np.maximum(np.cumsum(tail_mask, axis=1) - 1, 0)
        logits, cache = self._forward(ids, mask, positions, cache)
        return logits, cache, mask, positions

    def _forward(
        self, ids: IntArray, mask: IntArray, positions: IntArray, cache: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """One model call; returns host logits and the new cache (numpy arrays, or OrtValues with IO binding)."""
        if not self.io_binding:
            feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
            if self._has_position_ids:
                feed["position_ids"] = positions
            feed.update(zip(self._kv_names, (_host(c) for c in cache), strict=True))
            logits, *present = self._run(feed)
            return logits, present
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if self._has_position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, c in zip(self._kv_names, cache, strict=True):
            if isinstance(c, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(c))
            else:
                binding.bind_ortvalue_input(name, c)
        binding.bind_output("logits", self._device)
        for name in self._present_names:
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[Generation]:
        tok = self.tokenizer
        n = params.n
        batch = len(prompts)
        t0 = time.perf_counter()

        logits, cache, mask, positions = self._prefill(prompts)
        last_logits = logits[:, -1, :].astype(np.float32, copy=False)

        # Share the prefix: replicate the cache and the last logits N ways (rows item0·s0..s(N-1), item1·s0..).
        if n > 1:
            cache = [np.repeat(_host(c), n, axis=0) for c in cache]
            last_logits = np.repeat(last_logits, n, axis=0)
            mask = np.repeat(mask, n, axis=0)
            positions = np.repeat(positions, n, axis=0)
        rows = batch * n
        rngs = [np.random.default_rng([params.seed, seeds[r // n], r % n]) for r in range(rows)]
        active = np.arange(rows)  # original row index of each live row
        next_pos = positions[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        done_at = [0.0] * rows
        stats = self.last_stats

        def draw(step_logits: np.ndarray) -> IntArray:
            uniforms = None
            if params.temperature > 0:
                uniforms = np.array([rngs[r].random() for r in active], dtype=np.float64)
            return choose_tokens(
                step_logits,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                uniforms=uniforms,
            )

        chosen = draw(last_logits)
        ttft = time.perf_counter() - t0
        stats.prefill_s += ttft
        for step in range(params.max_new_tokens):
            lp = log_softmax_at(last_logits, chosen)
            keep: list[int] = []
            now = time.perf_counter() - t0
            for j, r in enumerate(active):
                token = int(chosen[j])
                if not params.ignore_eos and token in tok.stop_ids:
                    finish[r] = "stop"
                    done_at[r] = now
                    continue
                tokens[r].append(token)
                logprobs[r].append(float(lp[j]))
                if len(tokens[r]) >= params.max_new_tokens:
                    done_at[r] = now
                    continue
                keep.append(j)
            if not keep or step == params.max_new_tokens - 1:
                break
            if len(keep) < len(active):
                # Finished streams leave the batch: later steps only pay for live rows.
                sel = np.asarray(keep)
                active = active[sel]
                chosen = chosen[sel]
                cache = [_host(c)[sel] for c in cache]
                mask = mask[sel]
                next_pos = next_pos[sel]
            t_step = time.perf_counter()
            mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], axis=1)
            logits, cache = self._forward(chosen.reshape(-1, 1), mask, next_pos, cache)
            last_logits = logits[:, -1, :].astype(np.float32, copy=False)
            next_pos = next_pos + 1
            chosen = draw(last_logits)
            stats.decode_s += time.perf_counter() - t_step
            stats.decode_steps += 1
            stats.rows_per_step.append(len(active))

        out: list[Generation] = []
        for item in range(batch):
            samples = []
            for s in range(n):
                row = item * n + s
                lps = logprobs[row]
                samples.append(
                    Sample(
                        text=tok.decode(tokens[row]),
                        token_ids=tokens[row],
                        mean_logprob=float(np.mean(lps)) if lps else 0.0,
                        finish_reason=finish[row],
                    )
                )
                stats.tokens += len(tokens[row])
            latency = max(done_at[item * n : (item + 1) * n]) or (time.perf_counter() - t0)
            out.append(Generation(samples=samples, prompt_tokens=len(prompts[item]), latency_s=latency, ttft_s=ttft))
        return out


def _host(value: Any) -> np.ndarray:
    """A cache tensor as a numpy array (copied from the device when it lives there)."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def _common_prefix(prompts: Sequence[list[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        i = 0
        while i < length and other[i] == first[i]:
            i += 1
        length = i
    return length

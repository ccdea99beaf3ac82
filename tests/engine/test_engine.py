"""The inference engine on a tiny random Llama: exactness against transformers, batching, sampling, runtime."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workers.engine import Engine, ProviderUnavailable, SamplingParams, create_session
from workers.engine.chat import ChatTokenizer
from workers.engine.sampling import choose_tokens, log_softmax_at

QUESTIONS = [
    "What is two plus two?",
    "hello",
    "Please summarise the following paragraph in one sentence and keep the names of the people in it.",
    "Translate the word house into French.",
]
LONG_QUESTION = " ".join(["If a train leaves the station at noon and travels at sixty miles an hour,"] * 6)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


def greedy(engine: Engine, prompts: list[str], max_new_tokens: int = 10, **kw: Any) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kw)
    return [g.samples[0].token_ids for g in engine.generate(prompts, params)]


def feed(engine: Engine, ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs for one call of the ONNX session: `ids` [batch, seq] after `past` (no padding)."""
    batch, seq = ids.shape
    past_len = 0 if past is None else past[0].shape[2]
    if past is None:
        empty = np.zeros((batch, engine._kv_heads, 0, engine._head_dim), dtype=engine._kv_dtype)
        past = [empty] * len(engine._kv_names)
    out: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    out.update(zip(engine._kv_names, past, strict=True))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Exactness and batching
# ---------------------------------------------------------------------------------------------------------------


def test_chat_rendering_matches_transformers_apply_chat_template(tiny_engine: Engine, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    for question in QUESTIONS:
        messages = chat(question)
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tiny_engine.render(messages) == expected
        assert tiny_engine.tokenizer.encode(expected) == hf_tok.encode(expected, add_special_tokens=False)
    # The source folder keeps its template in tokenizer_config.json, the artifact in chat_template.jinja: both
    # must render the same text.
    source = ChatTokenizer.from_folder(tiny_model_dir)
    assert source.render(chat("hello")) == tiny_engine.render(chat("hello"))
    assert source.stop_ids == tiny_engine.tokenizer.stop_ids == frozenset({hf_tok.convert_tokens_to_ids("<|im_end|>")})


def test_greedy_tokens_match_transformers_generate(tiny_engine: Engine, hf_model: Any) -> None:
    import torch

    steps = 12
    prompts = [tiny_engine.render(chat(q)) for q in QUESTIONS]
    gens = tiny_engine.generate(prompts, SamplingParams(max_new_tokens=steps, ignore_eos=True))
    distinct = set()
    for prompt, gen in zip(prompts, gens, strict=True):
        ids = tiny_engine.tokenizer.encode(prompt)
        assert gen.prompt_tokens == len(ids)
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=steps,
                min_new_tokens=steps,
                eos_token_id=None,
                pad_token_id=tiny_engine.tokenizer.pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        expected = out.sequences[0, len(ids) :].tolist()
        sample = gen.samples[0]
        assert sample.token_ids == expected, prompt
        assert sample.finish_reason == "length"
        # The reported mean log-probability is the model's own (temperature 1) for the chosen tokens.
        logits = torch.cat(out.logits).float()
        logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(steps), torch.tensor(expected)]
        assert sample.mean_logprob == pytest.approx(float(logprobs.mean()), abs=1e-4)
        distinct.add(tuple(expected))
    # A degenerate model (one token forever) would make the comparison above meaningless.
    assert len(distinct) == len(prompts)


def test_kv_cache_replication_equals_separate_prefills(tiny_engine: Engine) -> None:
    engine = tiny_engine
    prompt = np.array([engine.tokenizer.encode(engine.render(chat(QUESTIONS[0])))])
    copies = 4
    next_tokens = np.array([[5], [77], [150], [300]])

    logits_one, *cache_one = engine._run(feed(engine, prompt))
    replicated = [np.repeat(c, copies, axis=0) for c in cache_one]
    step_shared, *_ = engine._run(feed(engine, next_tokens, replicated))

    logits_many, *cache_many = engine._run(feed(engine, np.repeat(prompt, copies, axis=0)))
    step_separate, *_ = engine._run(feed(engine, next_tokens, cache_many))

    assert np.allclose(np.repeat(logits_one, copies, axis=0), logits_many, atol=1e-4)
    assert step_shared.shape == (copies, 1, engine.session.get_outputs()[0].shape[2])
    assert np.allclose(step_shared, step_separate, atol=1e-4)
    # Each row really continued with its own token, and the cached step equals a full forward without a cache.
    assert not np.allclose(step_shared[0], step_shared[1], atol=1e-3)
    for row in range(copies):
        full = np.concatenate([prompt, next_tokens[row : row + 1]], axis=1)
        no_cache, *_ = engine._run(feed(engine, full))
        assert np.allclose(step_shared[row], no_cache[0], atol=1e-4)


def test_left_padding_does_not_change_greedy_tokens(tiny_engine: Engine) -> None:
    short = tiny_engine.render(chat("hello"))
    long = tiny_engine.render(chat(LONG_QUESTION))
    assert len(tiny_engine.tokenizer.encode(long)) > 3 * len(tiny_engine.tokenizer.encode(short))
    alone = greedy(tiny_engine, [short])[0]
    together = greedy(tiny_engine, [long, short])
    assert together[1] == alone
    assert together[0] == greedy(tiny_engine, [long])[0]


def test_a_shared_prompt_head_runs_once_without_changing_outputs(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = "You answer questions about numbers and words. " * 4
    prompts = [
        tiny_engine.render([{"role": "system", "content": head}, {"role": "user", "content": q}])
        for q in ("hello", "what is two plus two", LONG_QUESTION)
    ]
    encoded = [tiny_engine.tokenizer.encode(p) for p in prompts]
    calls: list[tuple[int, ...]] = []
    original = tiny_engine._forward

    def spy(ids: np.ndarray, *args: Any) -> tuple[np.ndarray, list[Any]]:
        calls.append(ids.shape)
        return original(ids, *args)

    monkeypatch.setattr(tiny_engine, "_forward", spy)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, ignore_eos=True, seed=5)
    shared = tiny_engine.generate(prompts, params)
    # The head runs as one row, then only the tails run for the three prompts.
    assert calls[0][0] == 1 and calls[0][1] >= 20
    assert calls[1][0] == 3 and calls[1][1] < max(len(e) for e in encoded)
    monkeypatch.setattr(Engine, "MIN_SHARED_PREFIX", 10**6)
    calls.clear()
    separate = tiny_engine.generate(prompts, params)
    assert calls[0] == (3, max(len(e) for e in encoded))
    for a, b in zip(shared, separate, strict=True):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
        assert [s.mean_logprob for s in a.samples] == pytest.approx([s.mean_logprob for s in b.samples], abs=1e-4)


def test_left_padding_does_not_change_seeded_samples(tiny_engine: Engine) -> None:
    short = tiny_engine.render(chat("hello"))
    long = tiny_engine.render(chat(LONG_QUESTION))
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=11)
    alone = tiny_engine.generate([short], params, seeds=[7])[0]
    together = tiny_engine.generate([long, short], params, seeds=[3, 7])[1]
    assert [s.token_ids for s in together.samples] == [s.token_ids for s in alone.samples]
    assert [s.mean_logprob for s in together.samples] == pytest.approx([s.mean_logprob for s in alone.samples])


def test_batches_split_by_max_rows_return_results_in_input_order(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [tiny_engine.render(chat(q)) for q in QUESTIONS]
    one_by_one = [greedy(tiny_engine, [p])[0] for p in prompts]
    assert greedy(tiny_engine, prompts) == one_by_one
    monkeypatch.setattr(tiny_engine, "max_rows", 2)
    params = SamplingParams(n=2, max_new_tokens=10, ignore_eos=True)
    gens = tiny_engine.generate(prompts, params)
    assert [g.samples[0].token_ids for g in gens] == one_by_one
    assert all(len(g.samples) == 2 and g.generated_tokens == 20 for g in gens)
    assert tiny_engine.last_stats.tokens == 80


def test_generate_rejects_mismatched_seeds_and_empty_prompts(tiny_engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny_engine.generate(["a", "b"], params, seeds=[1])
    with pytest.raises(ValueError, match="no tokens"):
        tiny_engine.generate_ids([[1, 2], []], params)


# ---------------------------------------------------------------------------------------------------------------
# Sampling through the engine
# ---------------------------------------------------------------------------------------------------------------


def _samples(engine: Engine, prompts: list[str], params: SamplingParams, seeds: list[int]) -> list[list[list[int]]]:
    return [[s.token_ids for s in g.samples] for g in engine.generate(prompts, params, seeds=seeds)]


def test_seeded_sampling_is_reproducible_and_the_seed_matters(tiny_engine: Engine) -> None:
    prompt = tiny_engine.render(chat(QUESTIONS[0]))
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, ignore_eos=True, seed=5)
    first = _samples(tiny_engine, [prompt], params, [0])
    assert _samples(tiny_engine, [prompt], params, [0]) == first
    assert _samples(tiny_engine, [prompt], params, [1]) != first
    other_params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, ignore_eos=True, seed=6)
    assert _samples(tiny_engine, [prompt], other_params, [0]) != first


def test_an_inputs_samples_do_not_depend_on_its_batch_companions(tiny_engine: Engine) -> None:
    prompts = [tiny_engine.render(chat(q)) for q in QUESTIONS]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=2)
    alone = _samples(tiny_engine, [prompts[0]], params, [42])[0]
    first_of_two = _samples(tiny_engine, [prompts[0], prompts[1]], params, [42, 9])[0]
    last_of_four = _samples(tiny_engine, [prompts[3], prompts[2], prompts[1], prompts[0]], params, [1, 2, 3, 42])[3]
    assert first_of_two == alone
    assert last_of_four == alone


def test_greedy_samples_are_identical(tiny_engine: Engine) -> None:
    prompt = tiny_engine.render(chat(QUESTIONS[2]))
    gen = tiny_engine.generate([prompt], SamplingParams(n=4, max_new_tokens=10, ignore_eos=True))[0]
    assert len(gen.samples) == 4
    assert all(s.token_ids == gen.samples[0].token_ids for s in gen.samples)
    assert gen.samples[0].token_ids == greedy(tiny_engine, [prompt])[0]
    assert len({s.mean_logprob for s in gen.samples}) == 1


def test_samples_at_temperature_one_differ(tiny_engine: Engine) -> None:
    prompt = tiny_engine.render(chat(QUESTIONS[2]))
    gen = tiny_engine.generate([prompt], SamplingParams(n=4, temperature=1.0, max_new_tokens=10, ignore_eos=True))[0]
    assert len({tuple(s.token_ids) for s in gen.samples}) > 1
    assert all(len(s.token_ids) == 10 for s in gen.samples)


def test_a_stream_that_stops_early_leaves_the_batch(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 8
    short = tiny_engine.render(chat("hello"))
    other = tiny_engine.render(chat(QUESTIONS[2]))  # longer, so `short` is row 0 of the batch
    row0, row1 = greedy(tiny_engine, [short, other], max_new_tokens=steps)
    # The first step >= 2 whose token appears neither earlier in row 0 nor anywhere in row 1.
    stop_at = next(s for s in range(2, steps - 1) if row0[s] not in row0[:s] and row0[s] not in row1)
    stop_token = row0[stop_at]

    monkeypatch.setattr(tiny_engine.tokenizer, "stop_ids", frozenset({stop_token}))
    first, second = tiny_engine.generate([short, other], SamplingParams(max_new_tokens=steps))
    assert first.samples[0].finish_reason == "stop"
    assert first.samples[0].token_ids == row0[:stop_at]
    assert second.samples[0].finish_reason == "length"
    assert second.samples[0].token_ids == row1
    stats = tiny_engine.last_stats
    assert stats.rows_per_step == [2] * stop_at + [1] * (steps - 1 - stop_at)
    assert stats.decode_steps == steps - 1
    assert stats.tokens == stop_at + steps

    # ignore_eos generates through the stop token.
    again = tiny_engine.generate([short], SamplingParams(max_new_tokens=steps, ignore_eos=True))[0].samples[0]
    assert again.token_ids == row0
    assert again.finish_reason == "length"


# ---------------------------------------------------------------------------------------------------------------
# choose_tokens
# ---------------------------------------------------------------------------------------------------------------


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_temperature_zero_is_argmax() -> None:
    logits = _logits(16, 50)
    picked = choose_tokens(logits, temperature=0.0, top_k=5, top_p=0.5, uniforms=None)
    assert picked.tolist() == logits.argmax(axis=1).tolist()
    assert picked.dtype == np.int64


def test_top_k_one_is_argmax_for_any_uniforms() -> None:
    logits = _logits(16, 50)
    for uniforms in (np.zeros(16), np.full(16, 0.999999), np.random.default_rng(1).random(16)):
        picked = choose_tokens(logits, temperature=1.5, top_k=1, top_p=1.0, uniforms=uniforms)
        assert picked.tolist() == logits.argmax(axis=1).tolist()


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = _logits(16, 1000)
    for uniforms in (np.zeros(16), np.full(16, 0.999999), np.random.default_rng(2).random(16)):
        picked = choose_tokens(logits, temperature=1.0, top_k=0, top_p=1e-6, uniforms=uniforms)
        assert picked.tolist() == logits.argmax(axis=1).tolist()


def test_sampling_needs_uniforms() -> None:
    with pytest.raises(ValueError, match="uniform"):
        choose_tokens(_logits(2, 10), temperature=1.0, top_k=0, top_p=1.0, uniforms=None)


def _frequencies(tokens: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(tokens, minlength=vocab).astype(np.float64)


def _chi_square(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * observed.sum()
    mask = expected > 0
    assert observed[~mask].sum() == 0, "drew a token that has probability zero"
    return float((((observed - expected) ** 2)[mask] / expected[mask]).sum())


DRAWS = 40_000


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    uniforms = np.random.default_rng(3).random(DRAWS)
    picked = choose_tokens(np.tile(row, (DRAWS, 1)), temperature=temperature, top_k=0, top_p=1.0, uniforms=uniforms)
    # 5 degrees of freedom: P(chi2 > 25) ~ 1e-4.
    assert _chi_square(_frequencies(picked, 6), _softmax(row / temperature)) < 25.0


def test_top_k_draws_follow_the_renormalised_top_k() -> None:
    row = np.array([0.0, 2.0, -1.0, 1.5, 1.0, 0.5], dtype=np.float32)
    uniforms = np.random.default_rng(4).random(DRAWS)
    picked = choose_tokens(np.tile(row, (DRAWS, 1)), temperature=1.0, top_k=3, top_p=1.0, uniforms=uniforms)
    expected = np.where(np.isin(np.arange(6), [1, 3, 4]), _softmax(row), 0.0)
    assert _chi_square(_frequencies(picked, 6), expected / expected.sum()) < 25.0


def test_top_p_draws_follow_the_renormalised_nucleus() -> None:
    row = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float64)).astype(np.float32)
    uniforms = np.random.default_rng(5).random(DRAWS)
    # 0.4 + 0.3 = 0.7 < 0.8, so the nucleus is {0.4, 0.3, 0.15}.
    picked = choose_tokens(np.tile(row, (DRAWS, 1)), temperature=1.0, top_k=0, top_p=0.8, uniforms=uniforms)
    expected = np.array([0.0, 0.4, 0.0, 0.3, 0.15])
    assert _chi_square(_frequencies(picked, 5), expected / expected.sum()) < 25.0


def test_top_p_nucleus_wider_than_the_candidate_window() -> None:
    vocab, rows = 1000, 4000
    flat = np.zeros((rows, vocab), dtype=np.float32)
    flat[0] = _logits(1, vocab, seed=9)[0]  # one peaked row shares the batch with flat ones
    uniforms = np.random.default_rng(6).random(rows)
    picked = choose_tokens(flat, temperature=1.0, top_k=0, top_p=0.9, uniforms=uniforms)
    assert picked.shape == (rows,)
    assert picked.min() >= 0 and picked.max() < vocab
    # With flat logits the nucleus holds 900 tokens, far more than the 256 examined first.
    assert len(set(picked[1:].tolist())) > 600


def test_log_softmax_at_matches_a_direct_computation() -> None:
    logits = _logits(3, 20)
    chosen = np.array([0, 7, 19], dtype=np.int64)
    expected = [np.log(_softmax(logits[i]))[c] for i, c in enumerate(chosen)]
    assert log_softmax_at(logits, chosen) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"temperature": -0.1},
        {"max_new_tokens": 0},
        {"top_k": -1},
    ],
)
def test_sampling_params_reject_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_loads(tiny_onnx_dir: Path) -> bool:
    try:
        create_session(tiny_onnx_dir / "model.onnx", "cuda")
    except ProviderUnavailable:
        return False
    return True


def test_engine_runs_on_the_cpu_here(tiny_engine: Engine, tiny_onnx_dir: Path, cuda_loads: bool) -> None:
    assert tiny_engine.provider == "cpu"
    assert tiny_engine.session.get_providers()[0] == "CPUExecutionProvider"
    if cuda_loads:
        pytest.skip("CUDA loads on this machine, so auto picks it")
    assert Engine(tiny_onnx_dir, provider="auto", threads=1).provider == "cpu"


def test_requesting_cuda_without_it_raises(tiny_onnx_dir: Path) -> None:
    try:
        create_session(tiny_onnx_dir / "model.onnx", "cuda")
    except ProviderUnavailable as exc:
        assert "CUDA was requested" in str(exc)
        return
    pytest.skip("CUDA loads on this machine")


def test_create_session_names_a_missing_file_and_rejects_unknown_providers(tmp_path: Path, tiny_onnx_dir: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        create_session(missing, "cpu")
    with pytest.raises(ValueError, match="provider"):
        create_session(tiny_onnx_dir / "model.onnx", "tpu")


def test_installed_runtime_is_onnxruntime_gpu_only() -> None:
    assert importlib.metadata.version("onnxruntime-gpu")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("onnxruntime")


@pytest.mark.parametrize("removed", ["tokenizer.json", "model.onnx"])
def test_engine_on_an_incomplete_folder_says_what_is_missing(tiny_onnx_dir: Path, tmp_path: Path, removed: str) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_onnx_dir, folder)
    (folder / removed).unlink()
    with pytest.raises(FileNotFoundError, match=removed.replace(".", r"\.")):
        Engine(folder, provider="cpu")


def test_engine_on_a_folder_without_a_chat_template_or_eos_says_so(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_onnx_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="chat template"):
        Engine(folder, provider="cpu")


def test_io_binding_and_plain_runs_give_the_same_samples(tiny_onnx_dir: Path) -> None:
    bound = Engine(tiny_onnx_dir, provider="cpu", threads=1, io_binding=True)
    plain = Engine(tiny_onnx_dir, provider="cpu", threads=1, io_binding=False)
    prompts = [bound.render(chat(q)) for q in ("hello", LONG_QUESTION, "what is two plus two")]
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=2)
    a = bound.generate(prompts, params)
    b = plain.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert [s.token_ids for s in x.samples] == [s.token_ids for s in y.samples]
        assert [s.mean_logprob for s in x.samples] == pytest.approx([s.mean_logprob for s in y.samples], abs=1e-5)

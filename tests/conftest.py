"""A tiny Llama built on the spot: a Hugging Face folder, its ONNX artifact and an engine over it.

Everything is made locally (a byte-level BPE trained on the text below, random weights from a fixed seed), so
nothing is downloaded. The weights use a wider initialisation than the default so that the random model's
next-token distribution depends on its input: with the default the model emits one token forever, and tests
that compare token streams would prove nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from registry.models import Dataset, DatasetItem, ModelArtifact
from workers import convert
from workers.engine import Engine

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the morning light.
A user asks the assistant a question and the assistant answers it with care, step by step, until the answer
is right. What is two plus two? Two plus two is four. What is the capital of France? The capital of France is
Paris. How many legs does a spider have? A spider has eight legs. Name a primary colour: red, blue or yellow.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, twenty, thirty, hundred.
The system prompt tells the model to be brief, to be helpful and to say when it does not know something.
Rivers flow to the sea, mountains rise above the clouds, and the weather changes with every passing season.
Please summarise the following paragraph in one sentence and keep the names of the people who appear in it.
Numbers such as 12, 345 and 6789 are written with digits; words such as alpha, beta, gamma and delta are not.
The library opens at nine and closes at five, except on Sunday when it stays closed for the whole day long.
Translate the word house into French: maison. Translate the word water into Spanish: agua. Thank you kindly.
If a train leaves the station at noon and travels at sixty miles an hour, how far has it gone by three o'clock?
It has travelled one hundred and eighty miles. Good questions deserve good answers, and short ones too.
"""


def _build_tokenizer() -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.split("\n"), trainer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama in Hugging Face format, with a ChatML tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama-hf")
    tokenizer = _build_tokenizer()
    pad_id, bos_id, eos_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    # The template goes into tokenizer_config.json (not chat_template.jinja), the older layout.
    fast.save_pretrained(out, save_jinja_files=False)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model converted by workers.convert from its Hugging Face folder."""
    from workers.convert import convert

    out = tmp_path_factory.mktemp("tiny-llama-artifacts") / "onnx"
    with warnings.catch_warnings():
        # The exporter's tracer warnings say nothing about the artifact.
        warnings.simplefilter("ignore")
        convert(tiny_model_dir, out, progress=lambda message: None)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_onnx_dir: Path) -> Engine:
    return Engine(tiny_onnx_dir, provider="cpu", threads=1)


@pytest.fixture
def artifact(tiny_onnx_dir: Path) -> ModelArtifact:
    """The tiny ONNX artifact registered in the database (the test must have database access)."""
    built = convert.load_converted(tiny_onnx_dir)
    return ModelArtifact.objects.create(
        name="tiny",
        sha256=built.sha256,
        path=str(tiny_onnx_dir),
        parameter_count=built.parameter_count,
        source_kind="onnx",
        source_path=str(tiny_onnx_dir),
        source_sha256=built.sha256,
    )


@pytest.fixture
def trainable(tiny_model_dir: Path) -> ModelArtifact:
    """An artifact imported (as the registry records it) from the tiny model's Hugging Face folder: a base that
    fine-tune jobs accept (its ONNX files are not needed until a worker trains it)."""
    return ModelArtifact.objects.create(
        name="tiny-hf",
        sha256="1" * 64,
        path="/artifacts/tiny",
        source_kind=ModelArtifact.SourceKind.HF,
        source_path=str(tiny_model_dir),
        source_sha256="2" * 64,
    )


@pytest.fixture
def pairs() -> Dataset:
    """Two training pairs (question -> answer)."""
    dataset = Dataset.objects.create(name="pairs", content_hash="3" * 64, item_count=2)
    for index, (question, answer) in enumerate([("2+2?", "4"), ("3+3?", "6")]):
        DatasetItem.objects.create(
            dataset=dataset, index=index, key=f"q{index}", inputs={"question": question}, expected=answer
        )
    return dataset

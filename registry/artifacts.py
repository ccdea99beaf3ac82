"""Registering ONNX model artifacts (the architecture layer) from GGUF files, HF folders or ONNX folders."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import transaction

from workers import convert

from .models import ModelArtifact


def import_model(source: Path, *, name: str = "", progress: convert.Progress = print) -> tuple[ModelArtifact, bool]:
    """Register `source` as an ONNX artifact; returns (artifact, created).

    Conversion is cached by the source's sha256: importing the same file again finds the built folder and the
    registered artifact and returns at once.
    """
    source = source.expanduser().resolve()
    kind = convert.detect_kind(source)
    progress(f"hashing {source}")
    source_hash = convert.source_sha256(source)
    existing = (
        ModelArtifact.objects.filter(source_sha256=source_hash, quantisation="", parent__isnull=True)
        .order_by("-created_at")
        .first()
    )
    if existing is not None and Path(existing.path, "model.onnx").is_file():
        current = existing.metadata.get("graph_version") == convert.GRAPH_VERSION
        if current and convert.artifact_sha256(Path(existing.path)) == existing.sha256:
            progress(f"already imported as artifact {existing.pk} ({existing.sha256[:12]}); nothing to do")
            return existing, False
        progress(f"artifact {existing.pk} was built by an older converter or changed on disk; rebuilding")
    # The graph version is part of the folder name: a rebuild never rewrites a folder another artifact uses.
    folder = settings.ARTIFACTS_DIR / f"{source_hash[:16]}-{kind}-g{convert.GRAPH_VERSION}"
    built = None
    if (folder / "model.onnx").is_file() and (folder / "fulcrum.json").is_file():
        built = convert.load_converted(folder)
        progress(f"reusing converted folder {folder}")
    if built is None:
        built = convert.convert(source, folder, progress=progress)
    with transaction.atomic():
        artifact, created = ModelArtifact.objects.update_or_create(
            sha256=built.sha256,
            defaults={
                "name": name or _default_name(source),
                "path": str(built.folder),
                "parameter_count": built.parameter_count,
                "dtype": built.dtype,
                "size_bytes": built.size_bytes,
                "source_kind": kind,
                "source_path": str(source),
                "source_sha256": source_hash,
                "chat_template": built.chat_template,
                "metadata": built.metadata,
            },
        )
    progress(f"{'registered' if created else 'updated'} artifact {artifact.pk}: {artifact}")
    return artifact, created


def _default_name(source: Path) -> str:
    return source.stem if source.is_file() else source.name


def make_variant(parent: ModelArtifact, kind: str, *, progress: convert.Progress = print) -> tuple[ModelArtifact, bool]:
    """Register the int8 or fp16 variant of `parent` as its own artifact, with `parent` as its lineage.

    Cached like an import: the same parent and kind give the already registered variant.
    """
    if kind not in convert.VARIANTS:
        raise convert.ConversionError(f"unknown variant {kind!r}; use one of {', '.join(convert.VARIANTS)}")
    dtype, quantisation, _ = convert.VARIANTS[kind]
    existing = ModelArtifact.objects.filter(parent=parent, dtype=dtype, quantisation=quantisation).first()
    if existing is not None and Path(existing.path, "model.onnx").is_file():
        progress(f"{kind} variant of artifact {parent.pk} already registered as artifact {existing.pk}")
        return existing, False
    folder = settings.ARTIFACTS_DIR / f"{parent.sha256[:16]}-{kind}"
    built = convert.make_variant(Path(parent.path), folder, kind, progress=progress)
    with transaction.atomic():
        artifact, created = ModelArtifact.objects.update_or_create(
            sha256=built.sha256,
            defaults={
                "name": f"{parent.name}-{kind}",
                "path": str(built.folder),
                "parameter_count": built.parameter_count or parent.parameter_count,
                "dtype": dtype,
                "quantisation": quantisation,
                "size_bytes": built.size_bytes,
                "source_kind": ModelArtifact.SourceKind.ONNX,
                "source_path": parent.path,
                "source_sha256": parent.sha256,
                "chat_template": built.chat_template,
                "parent": parent,
                "price_per_1k_tokens": parent.price_per_1k_tokens,
                "metadata": built.metadata,
            },
        )
    progress(f"{'registered' if created else 'updated'} artifact {artifact.pk}: {artifact} (from {parent.pk})")
    return artifact, created

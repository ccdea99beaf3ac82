"""Registering artifacts: conversion cached by source hash, clear errors for bad files, variants with lineage."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from registry.artifacts import import_model, make_variant
from registry.models import ModelArtifact
from workers import convert

pytestmark = pytest.mark.django_db


@pytest.fixture
def artifacts_dir(settings, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR  # type: ignore[no-any-return]


def test_a_second_import_of_the_same_source_is_instant(
    tiny_model_dir: Path, artifacts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, created = import_model(tiny_model_dir, name="tiny", progress=lambda _: None)
    assert created and first.source_kind == "hf" and Path(first.path, "model.onnx").is_file()
    assert first.sha256 == convert.artifact_sha256(Path(first.path))

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert", no_conversion)
    again, created = import_model(tiny_model_dir, progress=lambda _: None)
    assert not created and again.pk == first.pk
    assert ModelArtifact.objects.count() == 1


def test_a_corrupt_gguf_file_is_refused_and_nothing_is_registered(tmp_path: Path, artifacts_dir: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(convert.ConversionError, match=r"model\.gguf"):
        import_model(bad, progress=lambda _: None)
    assert not ModelArtifact.objects.exists()
    assert not any(p.name.endswith(".partial") or ".partial-" in p.name for p in artifacts_dir.glob("*"))


def test_import_model_command_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="does not exist"):
        call_command("import_model", str(tmp_path / "nothing.gguf"))


def test_variants_are_registered_once_with_their_parent(tiny_onnx_dir: Path, artifacts_dir: Path) -> None:
    parent, _ = import_model(tiny_onnx_dir, name="tiny", progress=lambda _: None)
    int8, created = make_variant(parent, "int8", progress=lambda _: None)
    assert created
    assert int8.parent == parent and int8.quantisation == "int8-dynamic" and int8.dtype == "float32"
    assert int8.source_sha256 == parent.sha256 and int8.sha256 != parent.sha256
    fp16, _ = make_variant(parent, "fp16", progress=lambda _: None)
    assert fp16.dtype == "float16" and fp16.parent == parent
    again, created = make_variant(parent, "int8", progress=lambda _: None)
    assert not created and again.pk == int8.pk
    assert set(parent.variants.all()) == {int8, fp16}


def test_make_variant_command_rejects_an_unknown_artifact() -> None:
    with pytest.raises(CommandError, match="no artifact with id 999"):
        call_command("make_variant", "999", "int8")

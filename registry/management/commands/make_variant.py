from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.artifacts import make_variant
from registry.models import ModelArtifact
from workers import convert


class Command(BaseCommand):
    help = "Derive an int8 (CPU) or fp16 (GPU) variant of a registered artifact and register it with its lineage."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("artifact", type=int, help="id of the artifact to derive from")
        parser.add_argument("kind", choices=sorted(convert.VARIANTS))

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        try:
            parent = ModelArtifact.objects.get(pk=options["artifact"])
        except ModelArtifact.DoesNotExist:
            raise CommandError(f"no artifact with id {options['artifact']}") from None

        def progress(message: str) -> None:
            self.stdout.write(f"[{time.monotonic() - started:6.1f}s] {message}")

        try:
            artifact, created = make_variant(parent, options["kind"], progress=progress)
        except convert.ConversionError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            self.style.SUCCESS(
                f"artifact {artifact.pk} {'created' if created else 'present'}: {artifact} "
                f"size={artifact.size_bytes / 1e6:.0f} MB parent={parent.pk}"
            )
        )

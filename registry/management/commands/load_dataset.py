"""Import a JSONL or CSV dataset: `manage.py load_dataset data/gsm.jsonl --name gsm --scorer numeric`."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from registry.datasets import FORMATS, DatasetImportError, import_dataset
from registry.models import Dataset


class Command(BaseCommand):
    help = (
        "Import a dataset from a JSONL or CSV file. Importing the same content under the same name again "
        "changes nothing and reports the dataset already stored."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("path", help="the .jsonl or .csv file")
        parser.add_argument("--name", required=True, help="dataset name (a slug, e.g. gsm-mini)")
        parser.add_argument("--scorer", required=True, choices=Dataset.Scorer.values, help="how answers are scored")
        parser.add_argument(
            "--scorer-pattern",
            default="",
            help="for --scorer regex: a regular expression whose first group (or whole match) is the answer",
        )
        parser.add_argument("--description", default="", help="free text kept with the dataset")
        parser.add_argument(
            "--format",
            dest="fmt",
            choices=FORMATS,
            default=None,
            help="file format (default: from the suffix)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            dataset, created = import_dataset(
                options["path"],
                name=options["name"],
                scorer=options["scorer"],
                scorer_pattern=options["scorer_pattern"],
                fmt=options["fmt"],
                description=options["description"],
            )
        except DatasetImportError as exc:
            raise CommandError(str(exc)) from None
        pattern = f" (pattern {dataset.scorer_pattern!r})" if dataset.scorer_pattern else ""
        facts = f"{dataset.item_count} items, scorer {dataset.scorer}{pattern}, content hash {dataset.content_hash}"
        if created:
            self.stdout.write(self.style.SUCCESS(f"Created dataset {dataset.name!r} (id {dataset.pk}): ") + facts)
        else:
            self.stdout.write(
                self.style.WARNING(f"Dataset {dataset.name!r} is already present (id {dataset.pk}): ")
                + facts
                + "; nothing was written"
            )

"""Work with prompts from the shell.

manage.py prompt create qa --template "Q: {{ question }}" --variables question --message "first cut"
manage.py prompt label qa prod 1 --reason "ship it"
manage.py prompt history qa
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_slug
from django.db import transaction

from registry import access
from registry.models import LabelMove, Prompt, PromptVersion


def _messages(exc: ValidationError) -> str:
    return "; ".join(exc.messages)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read the {what} {str(path)!r}: {exc}") from None


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"the {what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _get_prompt(name: str) -> Prompt:
    prompt = Prompt.objects.filter(name=name).first()
    if prompt is None:
        known = list(Prompt.objects.order_by("name").values_list("name", flat=True)[:20])
        raise CommandError(f"no prompt named {name!r} (prompts: {', '.join(known) or 'none yet'})")
    return prompt


def _get_version(prompt: Prompt, number: int) -> PromptVersion:
    version = prompt.versions.filter(number=number).first()
    if version is None:
        numbers = sorted(prompt.versions.values_list("number", flat=True))
        known = ", ".join(str(n) for n in numbers) or "none yet"
        raise CommandError(f"prompt {prompt.name!r} has no version {number} (versions: {known})")
    return version


class Command(BaseCommand):
    help = "Create prompt versions, move labels (a rollback is a move) and show a prompt's history."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{create,label,history}")

        create = actions.add_parser(
            "create",
            help="store a new version; identical content returns the version already stored",
            description="Store a new immutable version of a prompt, creating the prompt if it is new.",
        )
        create.add_argument("name", help="prompt name (a slug)")
        source = create.add_mutually_exclusive_group(required=True)
        source.add_argument("--template", help="Jinja2 template of the user turn")
        source.add_argument("--template-file", type=Path, help="read the template from this file")
        create.add_argument(
            "--variables", default="", help="comma-separated names the template reads, e.g. question,context"
        )
        create.add_argument("--system", default="", help="system message (a template too)")
        create.add_argument(
            "--examples-file",
            type=Path,
            help='JSON file with few-shot examples: [{"inputs": {...}, "output": "..."}]',
        )
        create.add_argument("--params", default="{}", help='model parameters as JSON, e.g. {"max_new_tokens": 64}')
        create.add_argument("--message", default="", help="commit message")
        create.add_argument("--parent", type=int, help="parent version number (default: the latest)")
        create.add_argument("--description", default="", help="description, when the prompt is new")

        label = actions.add_parser(
            "label",
            help="point a label at a version",
            description="Point a label at a version and record it.",
        )
        label.add_argument("name", help="prompt name")
        label.add_argument("label", help="label, e.g. prod")
        label.add_argument("number", metavar="VERSION_NUMBER", type=int, help="version number")
        label.add_argument("--reason", default="", help="why; kept in the label's history")

        history = actions.add_parser("history", help="list versions and label moves")
        history.add_argument("name", help="prompt name")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            self.create(options)
        elif action == "label":
            self.label(options)
        else:
            self.history(options["name"])

    def create(self, options: dict[str, Any]) -> None:
        name: str = options["name"]
        try:
            validate_slug(name)
        except ValidationError:
            raise CommandError(f"prompt name {name!r} must be a slug (letters, digits, '-' or '_')") from None
        if options["template_file"] is not None:
            template = _read_text(options["template_file"], "template file")
        else:
            template = options["template"]
        variables = [part.strip() for part in options["variables"].split(",") if part.strip()]
        examples: Any = []
        if options["examples_file"] is not None:
            examples = _parse_json(_read_text(options["examples_file"], "examples file"), "examples file")
            if not isinstance(examples, list):
                raise CommandError('the examples file must hold a JSON list of {"inputs": {...}, "output": "..."}')
        params = _parse_json(options["params"], "--params value")
        if not isinstance(params, dict):
            raise CommandError("--params must be a JSON object")

        try:
            with transaction.atomic():
                prompt, prompt_created = Prompt.objects.get_or_create(
                    name=name, defaults={"description": options["description"]}
                )
                parent = _get_version(prompt, options["parent"]) if options["parent"] is not None else None
                version, created = prompt.create_version(
                    template=template,
                    variables=variables,
                    system_message=options["system"],
                    examples=examples,
                    params=params,
                    commit_message=options["message"],
                    parent=parent,
                )
                if created:
                    access.record(access.Actor(via="cli"), "version.create", version, number=version.number)
        except ValidationError as exc:
            raise CommandError(f"prompt {name!r}: {_messages(exc)}") from None

        if prompt_created:
            self.stdout.write(f"Created prompt {name!r}")
        if created:
            parent_text = f"parent v{version.parent.number}" if version.parent else "no parent"
            self.stdout.write(
                self.style.SUCCESS(f"Stored {version}") + f" ({parent_text}, content hash {version.content_hash[:12]})"
            )
        else:
            self.stdout.write(
                self.style.WARNING(f"Identical content is already stored as {version}")
                + f" (content hash {version.content_hash[:12]}); nothing new was stored"
            )

    def label(self, options: dict[str, Any]) -> None:
        prompt = _get_prompt(options["name"])
        version = _get_version(prompt, options["number"])
        label_name: str = options["label"]
        current = prompt.labels.filter(name=label_name).first()
        if current is not None and current.version_id == version.pk:
            self.stdout.write(f"{prompt.name}:{label_name} already points at v{version.number}; nothing moved")
            return
        try:
            with transaction.atomic():
                move = prompt.move_label(label_name, version, reason=options["reason"])
                access.record(
                    access.Actor(via="cli"),
                    "label.move",
                    move.label,
                    object_repr=f"{prompt.name}:{label_name}",
                    from_version=move.from_version.number if move.from_version else None,
                    to_version=version.number,
                    reason=options["reason"],
                )
        except ValidationError as exc:
            raise CommandError(f"prompt {prompt.name!r}: {_messages(exc)}") from None
        start = f"v{move.from_version.number}" if move.from_version else "(new label)"
        self.stdout.write(self.style.SUCCESS(f"{prompt.name}:{label_name} {start} -> v{version.number}"))

    def history(self, name: str) -> None:
        prompt = _get_prompt(name)
        versions = list(prompt.versions.select_related("parent", "created_by").order_by("-number"))
        labels = list(prompt.labels.select_related("version").order_by("name"))
        labels_by_version: dict[int, list[str]] = {}
        for label in labels:
            labels_by_version.setdefault(label.version_id, []).append(label.name)

        summary = ", ".join(f"{label.name} -> v{label.version.number}" for label in labels) or "none"
        self.stdout.write(self.style.MIGRATE_HEADING(f"Prompt {prompt.name!r}"))
        if prompt.description:
            self.stdout.write(f"  {prompt.description}")
        self.stdout.write(f"  {len(versions)} version(s); labels: {summary}")

        self.stdout.write(self.style.MIGRATE_HEADING("Versions (newest first)"))
        if not versions:
            self.stdout.write("  none yet")
        for version in versions:
            parent = f"parent v{version.parent.number}" if version.parent else "no parent"
            tags = f" [{', '.join(labels_by_version[version.pk])}]" if version.pk in labels_by_version else ""
            author = f" by {version.created_by}" if version.created_by else ""
            message = f"  {version.commit_message}" if version.commit_message else ""
            self.stdout.write(
                f"  v{version.number:<4} {version.created_at:%Y-%m-%d %H:%M}  {version.content_hash[:12]}  "
                f"{parent}{author}{tags}{message}"
            )

        moves = list(
            LabelMove.objects.filter(label__prompt=prompt).select_related(
                "label", "from_version", "to_version", "moved_by"
            )
        )
        self.stdout.write(self.style.MIGRATE_HEADING("Label moves (newest first)"))
        if not moves:
            self.stdout.write("  none yet")
        for move in moves:
            start = f"v{move.from_version.number}" if move.from_version else "(new)"
            who = f" by {move.moved_by}" if move.moved_by else ""
            reason = f"  {move.reason}" if move.reason else ""
            self.stdout.write(
                f"  {move.moved_at:%Y-%m-%d %H:%M}  {move.label.name}: {start} -> v{move.to_version.number}"
                f"{who}{reason}"
            )

#!/usr/bin/env python
"""Django's command-line utility for Fulcrum."""

import os
import sys
from pathlib import Path


def main() -> None:
    # The Django project package lives in platform/; platform/ itself is not a package, so the
    # standard library's `platform` module stays importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent / "platform"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fulcrum.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()

"""Fetch prompts from a Fulcrum registry, with an in-process cache. Standard library only: no Django needed.

    from fulcrum_client import FulcrumClient

    client = FulcrumClient("https://fulcrum.internal", token="flc_…", ttl=60)
    prompt = client.get_prompt("qa", fallback="Answer: {{ question }}")
    prompt.template, prompt.version, prompt.source

See fulcrum_client.client for the caching rules.
"""

from .client import ClientError, FulcrumClient, Prompt, PromptNotFound, ServerUnavailable

__all__ = ["ClientError", "FulcrumClient", "Prompt", "PromptNotFound", "ServerUnavailable"]

"""Celery tasks (thin, Django-aware) and the inference engine and scorers (plain Python, no Django)."""

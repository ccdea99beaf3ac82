"""The registry's REST API (Django REST framework); mounted at /api/ by platform/fulcrum/urls.py."""

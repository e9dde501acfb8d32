"""Recipes: YAML files validated into typed sections (see schema.py) before anything loads."""

"""Shared fixtures for every test tier."""

pytest_plugins = ["fixtures_models"]

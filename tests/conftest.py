"""Shared pytest setup: markers beyond pyproject's (registered here so `-m` selects them without warnings)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deployment: starts a real SuperLink and SuperNodes on 127.0.0.1 (pytest -m deployment)"
    )

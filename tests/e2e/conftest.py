from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from services.core.settings import Settings
from tests.support.stack import Stack, running_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def stack(settings: Settings, db: Engine, tmp_path: Path) -> Iterator[Stack]:
    """An empty database and the real processes, started by the test as it needs them."""
    with running_stack(settings, tmp_path) as running:
        yield running
        codes = running.stop_all()
        assert all(code == 0 for code in codes.values()), (codes, running.logs()[-5000:])

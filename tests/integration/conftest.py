from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, running


@pytest.fixture
def mailfw(tmp_path: Path) -> Iterator[MailfwProcess]:
    """
    A running C{twistd -n mailfw} on its embedded default, on free loopback
    ports, with its data in a temporary directory.
    """
    yield from running(tmp_path / "data")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)

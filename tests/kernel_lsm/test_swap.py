"""Policy changes under a running agent: files and network switch to the new
policy atomically (each decision sees one whole policy, never an empty
table: the always-allowed file is never refused), and records follow the
live policy. The scenarios are shared with the compat suite (scenarios.py)."""

from __future__ import annotations

import pytest

from harness import running
from scenarios import test_swap_under_a_running_agent, test_update_that_does_not_fit_changes_nothing  # noqa: F401


@pytest.fixture(scope="module")
def lz(tmp_path_factory):
    with running(str(tmp_path_factory.mktemp("swap"))) as lz:
        yield lz

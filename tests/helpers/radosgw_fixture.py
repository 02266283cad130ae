"""The session's radosgw, as a pytest fixture. In a conftest or a test module:

    from helpers.radosgw_fixture import radosgw  # noqa: F401 (a fixture, used by name)

    def test_something(radosgw: Endpoint) -> None:
        client = make_bucket(radosgw, "my-test-bucket")

One cluster per importer for the whole session: give each test its own bucket. Pytest keeps
a session fixture per module that defines it, so every module importing this starts its own
cluster (a second or two); import it in a conftest.py instead and all the tests under it
share one. Without the packages the fixture fails, not skips: CI installs them through
scripts/setup.sh, so their absence is a broken machine, not a choice.
"""

from collections.abc import Iterator

import pytest

from helpers.radosgw import PACKAGES, Endpoint, missing_tools, running_radosgw


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """A running radosgw for the session, stopped (daemons killed) when it ends."""
    if missing := missing_tools():
        pytest.fail(
            f"radosgw fixture: {', '.join(missing)} not found; install Debian's "
            f"{' '.join(PACKAGES)} (scripts/setup.sh does)",
            pytrace=False,
        )
    with running_radosgw(tmp_path_factory.mktemp("radosgw")) as endpoint:
        yield endpoint

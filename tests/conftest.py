import pytest

pytest_plugins = ["testnet.fixtures", "testnet.cluster.fixtures"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``make test``'s two pytest-xdist workers (``--dist loadgroup``) a file's tests stay
    on one worker, so a module's fixture (a simulated run, a network) is built once, not once
    per worker; files that share the session's test cluster carry one group of their own."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))

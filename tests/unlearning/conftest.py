import pytest


@pytest.fixture(scope="session", autouse=True)
def erasus_cache(tmp_path_factory):
    """Models trained by the tests are cached in a temporary folder, never in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ERASUS_CACHE", str(tmp_path_factory.mktemp("erasus-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def class_scenario(erasus_cache):
    from erasus.cli import scenario_data

    return scenario_data("class")

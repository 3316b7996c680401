import pytest


@pytest.fixture(scope="session")
def class_scenario(erasus_cache):
    from erasus.cli import scenario_data

    return scenario_data("class")

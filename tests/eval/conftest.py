import pytest
from eval_tiny_models import build_all


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("eval_models"))

import pytest

from mixcache_compile.export import export
from tests.export.common import MODELS


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """``export_dir(name)``: the ONNX export of a tiny model (policy static every=2), made once."""
    made = {}

    def get(name: str):
        if name not in made:
            make_pipe, make_kwargs, _ = MODELS[name]
            out = tmp_path_factory.mktemp(f"export-{name}")
            made[name] = (out, export(make_pipe(), make_kwargs(steps=1), out, policy="static", every=2))
        return made[name]

    return get

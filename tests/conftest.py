"""Fixtures shared by every test folder, the folder markers, and the matrix's per-cell outcomes.

    tests/unit         in process, no launches (`make test-fast`)
    tests/integration  real launches on CPU ranks
    tests/slurm        a real two-node Slurm on this host
Helpers live in tests/support (imported as `support.*`).
"""

from pathlib import Path

import pytest

from support.matrix import CELL_OUTCOMES

FOLDER_MARKERS = ("unit", "integration", "slurm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cell = item.callspec.params.get("cell") if hasattr(item, "callspec") else None
    if cell is not None and (report.when == "call" or report.failed):
        item.config.stash.setdefault(CELL_OUTCOMES, {}).setdefault(cell, []).append(report.passed)


@pytest.fixture(scope="session", autouse=True)
def caches(tmp_path_factory) -> dict[str, Path]:
    """Tokenized data and quantized bases are cached for the session in folders of their own, never in the
    user's ~/.cache; launches inherit them."""
    import os

    paths = {}
    for env, name in (("QLAUNCH_DATA_CACHE", "data-cache"), ("QLAUNCH_QUANT_CACHE", "quant-cache")):
        paths[env] = tmp_path_factory.mktemp(name)
        os.environ[env] = str(paths[env])
    return paths


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """The demo's base model (random Llama, saved with save_pretrained), tokenizer and data."""
    from launcher.demo import prepare_demo

    workdir = tmp_path_factory.mktemp("demo")
    prepare_demo(workdir)
    return workdir


@pytest.fixture(scope="session")
def family_assets(tmp_path_factory):
    """support/families.py's models: each family's model, tokenizer and data, built once per session on first use."""
    from support.families import BY_NAME, build_family

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(BY_NAME[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def vision_assets(tmp_path_factory):
    """support/vision.py's models: each vision-language family's model, processor and image data, built once per
    session on first use."""
    from support.vision import VISION_BY_NAME, build_vision_family

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_vision_family(VISION_BY_NAME[name], tmp_path_factory.mktemp(f"vision-{name}"))
        return built[name]

    return get


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if `qlaunch train` gets as far as starting `accelerate launch`."""
    from launcher import launch

    def refuse(*args, **kwargs):
        raise AssertionError("accelerate launch was started, but the command should have stopped before it")

    monkeypatch.setattr(launch, "launch", refuse)

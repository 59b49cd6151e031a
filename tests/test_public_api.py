"""The public surface is deliberate: exactly these names, each importable."""

import importlib
import importlib.metadata
import inspect

import hats_margin


def test_all_is_the_public_surface():
    assert hats_margin.__all__ == sorted(
        [
            "ArgumentError",
            "HatsMarginError",
            "InputCatalogError",
            "ManyMarginsResult",
            "MarginCacheArguments",
            "MarginCacheResult",
            "OutputExistsError",
            "OutputLockedError",
            "ResumeMismatchError",
            "ScriptGuardError",
            "StageFailedError",
            "__version__",
            "pipeline",
            "pipeline_with_client",
            "verify_margin",
        ]
    )
    # each name is the object defined in its home module (not a module, a stand-in or another name)
    homes = {
        "hats_margin.errors": ["ArgumentError", "HatsMarginError", "InputCatalogError", "OutputExistsError",
                               "OutputLockedError", "ResumeMismatchError", "ScriptGuardError", "StageFailedError"],
        "hats_margin.arguments": ["MarginCacheArguments"],
        "hats_margin.orchestrator": ["ManyMarginsResult", "MarginCacheResult", "pipeline", "pipeline_with_client"],
        "hats_margin.verify": ["verify_margin"],
    }
    for module_name, names in homes.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(hats_margin, name) is getattr(module, name), name
            assert getattr(module, name).__name__ == name, name
    assert sorted([*(n for names in homes.values() for n in names), "__version__"]) == hats_margin.__all__
    assert hats_margin.__version__ == importlib.metadata.version("hats-margin")


def test_errors_are_also_builtins():
    assert issubclass(hats_margin.ArgumentError, ValueError)
    assert issubclass(hats_margin.InputCatalogError, ValueError)
    assert issubclass(hats_margin.OutputExistsError, FileExistsError)
    assert issubclass(hats_margin.StageFailedError, RuntimeError)
    for name in ("ArgumentError", "InputCatalogError", "OutputExistsError", "OutputLockedError",
                 "ResumeMismatchError", "StageFailedError"):
        assert issubclass(getattr(hats_margin, name), hats_margin.HatsMarginError)


def test_pipeline_is_the_function_after_every_submodule_is_imported():
    import pkgutil

    for module in pkgutil.walk_packages(hats_margin.__path__, "hats_margin."):
        importlib.import_module(module.name)
    from hats_margin import orchestrator, pipeline, pipeline_with_client

    assert pipeline is orchestrator.pipeline and pipeline.__name__ == "pipeline"
    assert pipeline_with_client is orchestrator.pipeline_with_client
    assert pipeline_with_client.__name__ == "pipeline_with_client"
    assert list(inspect.signature(pipeline_with_client).parameters)[:2] == ["args", "client"]


def test_synthetic_data_lives_in_the_testing_subpackage_only():
    import ast
    import importlib.util
    from pathlib import Path

    # the test and benchmark data writer is in hats_margin.testing, not the main namespace
    assert importlib.util.find_spec("hats_margin.synthetic") is None
    from hats_margin.testing import synthetic

    assert callable(synthetic.write_hats_catalog) and callable(synthetic.realistic_sky)
    # and no runtime module imports it
    root = Path(hats_margin.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "testing" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any("synthetic" in n or n.endswith("testing") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []

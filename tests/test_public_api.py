"""The public surface is deliberate: exactly these names, each importable."""

import hats_margin


def test_all_is_the_public_surface():
    assert hats_margin.__all__ == sorted(
        [
            "ArgumentError",
            "HatsMarginError",
            "InputCatalogError",
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
    for name in hats_margin.__all__:
        assert getattr(hats_margin, name) is not None


def test_errors_are_also_builtins():
    assert issubclass(hats_margin.ArgumentError, ValueError)
    assert issubclass(hats_margin.InputCatalogError, ValueError)
    assert issubclass(hats_margin.OutputExistsError, FileExistsError)
    assert issubclass(hats_margin.StageFailedError, RuntimeError)
    for name in ("ArgumentError", "InputCatalogError", "OutputExistsError", "OutputLockedError",
                 "ResumeMismatchError", "StageFailedError"):
        assert issubclass(getattr(hats_margin, name), hats_margin.HatsMarginError)


def test_pipeline_is_the_function_after_every_submodule_is_imported():
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(hats_margin.__path__, "hats_margin."):
        importlib.import_module(module.name)
    from hats_margin import pipeline, pipeline_with_client

    assert callable(pipeline) and pipeline.__name__ == "pipeline"
    assert callable(pipeline_with_client)

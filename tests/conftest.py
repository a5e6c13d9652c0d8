"""Shared pytest setup: CPU only, deterministic, no network."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's cheap CPU code generation (LLVM unoptimized): the same HLO programs, passes and buffer assignment, compiled
# in about half the time; compiling tiny programs is most of what the suite spends. Subprocesses that set their
# own XLA_FLAGS (several host devices) compile as usual.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
    """A persistent XLA cache for one test module: its runs of the same program (resume, reruns, subprocesses)
    reuse one compiled step. Use with `pytestmark = pytest.mark.usefixtures("module_compilation_cache")`."""
    import jax

    path = str(tmp_path_factory.mktemp("jax_cache"))
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://... paths served from tmp_path/gcs through etils' backend mock (no network)."""
    root = tmp_path / "gcs"
    root.mkdir()

    def local(path):
        path = os.fspath(path)
        return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

    def remap(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def open_(fn, path, mode, *args, **kwargs):  # an object store has no folders to create first
        if any(c in mode for c in "wax"):
            os.makedirs(os.path.dirname(local(path)), exist_ok=True)
        return fn(local(path), mode, *args, **kwargs)

    def remap2(fn, src, dst, *args, **kwargs):
        return fn(local(src), local(dst), *args, **kwargs)

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a resolved URL would show up here as cwd/gs:/...
    from etils.epath import testing as epath_testing

    with epath_testing.mock_epath(open=open_, exists=remap, isdir=remap, makedirs=remap, mkdir=remap,
                                  listdir=remap, glob=remap, remove=remap, rmtree=remap, stat=remap,
                                  copy=remap2, rename=remap2, replace=remap2):
        yield root
    assert not list(work.iterdir()), f"a URL was resolved against the cwd: {list(work.rglob('*'))}"

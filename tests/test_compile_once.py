"""A study's cost is training, not compilation: programs never depend on how many trials are alive,
and a re-run or resumed study loads every program from the persistent compilation cache.

Each study runs in a fresh interpreter with its own cache directory, so that programs compiled by
other tests (held in this process) cannot hide a compile.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from sm2jax.compile_cache import count_compiles
    with count_compiles() as tally:  # the whole process: imports, set-up, every phase
        from sm2jax.space import Categorical, LogUniform, SearchSpace
        from sm2jax.study import Study
        from sm2jax.spec import StudySpec
        space = SearchSpace({"learning_rate": LogUniform(1e-3, 1e-1, num=3), "batch_size": Categorical([16, 32, 64])})
        spec = StudySpec(space=space.to_json(), dataset="digits", explore_budget=0.25, min_budget=1, max_budget=3, eta=3,
                         idle_seconds=0.0, probe_width=False, energy_method="estimated")
        for directory in sys.argv[1:]:
            results = Study(directory, spec if directory.endswith("new") else None, progress=False).run()
    print(json.dumps({**tally.to_json(), "backend_compiles": tally.backend_compiles,
                      "decisions": [(d["phase"], d["trial_id"], d["kept"]) for d in results["decisions"]],
                      "selected": results["selected"]["trial_id"], "study_compilation": results["compilation"],
                      "quick": sorted({c["quick"] for hw in results["hardware"].values() for c in hw["choices"] if "quick" in c})}))
""")


def _run(cache, *dirs):
    env = {**os.environ, "SM2JAX_COMPILE_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, dirs)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_study_compiles_each_program_once_and_a_warm_cache_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    cold = _run(cache, tmp_path / "a-new")
    # 3 signatures (batch sizes 16, 32, 64), exploration and 2 rungs, survivors shrinking every phase:
    # at most 3 programs per signature. Init and eval do not depend on the batch size, so they are
    # shared: one init, one eval and one train program per batch size.
    kept = {phase: sum(k for p, _, k in cold["decisions"] if p == phase) for phase in ("explore", "rung-1", "rung-2")}
    assert kept["explore"] > kept["rung-1"] > kept["rung-2"] == 1  # the trial count changed every phase
    assert cold["backend_compiles"] <= 3 * 3
    assert cold["programs"] == {"jit(init_trial)": 1, "jit(train_chunk)": 3, "jit(eval_chunk)": 1}
    assert cold["study_compilation"]["backend_compiles"] == cold["backend_compiles"]
    # A study this short trains with quick programs on a CPU backend (decided from FLOPs, so a resumed
    # run makes the same choice and finds the same programs in the cache below).
    assert cold["quick"] == [jax.default_backend() == "cpu"]

    # Warm cache: resume the finished study from its second-to-last phase, and re-run it afresh.
    os.remove(tmp_path / "a-new" / "progress" / "phase-2.json")
    os.remove(tmp_path / "a-new" / "results.json")
    for warm in (_run(cache, tmp_path / "a-new"), _run(cache, tmp_path / "b-new")):
        assert warm["backend_compiles"] == 0 and warm["cache_hits"] >= 2  # at least train and eval
        # JAX's own estimate (stored compile time minus load time) of what the hits saved; it can
        # round to 0 on a loaded machine, so only its presence and sign are checked.
        assert warm["study_compilation"]["cache_hits"] >= 2 and warm["study_compilation"]["cache_saved_seconds"] >= 0
        assert warm["selected"] is not None
    assert warm["programs"] == cold["programs"]  # the fresh re-run requested the same programs, all hits


def test_compile_cache_location_is_one_setting(tmp_path, monkeypatch):
    from sm2jax import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == str(tmp_path / "xdg" / "sm2jax" / "xla")
    configured = compile_cache.jax.config.jax_compilation_cache_dir
    if configured:  # a directory configured through JAX itself is respected, whatever the setting says
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
        assert compile_cache.enable_compile_cache() == configured
    compile_cache.jax.config.update("jax_compilation_cache_dir", None)
    try:
        for off in ("off", "0", "false"):
            monkeypatch.setenv(compile_cache.ENV, off)
            assert compile_cache.enable_compile_cache() is None
            assert compile_cache.jax.config.jax_compilation_cache_dir is None
    finally:
        compile_cache.jax.config.update("jax_compilation_cache_dir", configured)

"""``sm2jax`` command line: ``run``, ``resume`` and ``report`` studies."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys

# What --help lists, without importing JAX (tests/test_cli.py holds them equal to the modules' own).
PRESET_NAMES = ("cifar10", "digits", "household_power", "mnist1d", "wikitext2")  # sm2jax.presets.PRESETS
ENERGY_METHODS = ("nvml-counter", "nvml-power", "nvml-mixed", "rapl", "estimated", "unavailable")  # meters.METHODS


def _budget(args) -> dict:
    """The spec fields ``--budget-kwh`` and ``--budget-hours`` set (validated by the spec)."""
    out = {}
    if getattr(args, "budget_kwh", None) is not None:
        out["max_energy_joules"] = args.budget_kwh * 3.6e6
    if getattr(args, "budget_hours", None) is not None:
        out["max_wall_seconds"] = args.budget_hours * 3600.0
    return out


def _run(args) -> dict:
    from sm2jax.hyperband import run_hyperband
    from sm2jax.store.folder import StudyDir
    from sm2jax.study import Study

    spec, directory = _spec_and_dir(args)
    if StudyDir(directory).bracket_run():  # a Hyperband run of the earlier layout: finished as begun
        return run_hyperband(directory, spec, progress=not args.no_progress, devices=args.devices)
    study = Study(
        directory, spec, progress=not args.no_progress, devices=args.devices
    )  # validates before anything is said
    if study.folder.saved_phases() and study.progress_bar:
        print(f"resuming the study in {directory}", file=sys.stderr)
    return study.run()


def _plan(args) -> int:
    """``sm2jax plan``: the study ``run`` would run, planned by a short probe (nothing trained in
    its folder); the plan is kept there (``plan.json``) for the report's plan against actual."""
    from sm2jax.plan import format_plan
    from sm2jax.store.folder import StudyDir
    from sm2jax.study import plan_study

    spec, directory = _spec_and_dir(args)
    if args.mode == "hyperband":
        raise ValueError(
            "sm2jax plan predicts a study of one round, and Hyperband's brackets are its rounds: plan a bracket with --mode sh and its --set rungs"
        )
    folder = StudyDir(directory)
    if folder.has_run():
        raise ValueError(f"{directory} holds a study that has run: `sm2jax report {directory}` shows its cost so far")
    plan = plan_study(spec, devices=args.devices)
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
    folder.write_plan(plan.to_json())
    print(
        f"wrote {folder.plan_path} (`sm2jax run` with the same arguments reports plan against actual)", file=sys.stderr
    )
    return 0


def _spec_and_dir(args):
    """The spec and folder the run arguments name (``--dir``, else runs/PRESET-MODE)."""
    from sm2jax.presets import PRESETS

    spec = _load_config(args.config, args.quick) if args.config else PRESETS[args.preset](quick=args.quick)
    spec = apply_overrides(spec, args.set)
    overrides = {"energy_method": args.energy, "mode": args.mode}
    if args.idle_seconds is not None:
        overrides["idle_seconds"] = args.idle_seconds
    if args.steps_per_window is not None:
        overrides["steps_per_window"] = args.steps_per_window
    if args.no_probe:
        overrides["probe_width"] = False
    if args.samples is not None:  # cohort-aware: keeps a cohort-aware sampler the spec names, else Sobol'
        overrides["num_samples"] = args.samples
        overrides["sampler"] = spec.sampler if spec.sampler not in ("grid", "random") else "sobol"
    if args.imports:
        overrides["imports"] = sorted({*spec.imports, *args.imports})
    if args.data_dir:
        overrides["dataset_options"] = {**spec.dataset_options, "data_dir": os.path.abspath(args.data_dir)}
    spec = dataclasses.replace(spec, **overrides, **_budget(args))
    name = os.path.basename(os.path.dirname(os.path.abspath(args.config))) if args.config else args.preset
    directory = args.dir or os.path.join("runs", f"{name}-{args.mode}{'-quick' if args.quick else ''}")
    args.dir = directory  # named in the hint after Ctrl-C
    return spec, directory


def _load_config(path: str, quick: bool):
    """``get_config()`` of an experiment's ``config.py`` (``get_config(quick=True)`` with --quick)."""
    import importlib.util
    import inspect

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}: name an experiments/NAME/config.py")
    spec_file = importlib.util.spec_from_file_location(f"sm2jax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(): it should return a StudySpec")
    takes_quick = "quick" in inspect.signature(module.get_config).parameters
    if quick and not takes_quick:
        raise ValueError(f"{path}: get_config() has no quick variant (add a `quick: bool = False` parameter)")
    return module.get_config(quick=True) if quick else module.get_config()


def apply_overrides(spec, assignments: list[str]):
    """``spec`` with ``FIELD=VALUE`` assignments applied (VALUE parsed as JSON, else taken as a
    string; ``dataset_options.KEY=VALUE`` sets one option; ``space.NAME=VALUE`` sets one
    hyperparameter's domain: a JSON domain, a list of choices, or one value), validated like any
    StudySpec."""
    from sm2jax.space import DEFAULTS

    fields = {f.name for f in dataclasses.fields(spec)}
    changes: dict = {}
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set max_budget=3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        top, _, sub = key.partition(".")
        if top not in fields and top in DEFAULTS:
            raise ValueError(
                f"--set {item!r}: {top!r} is a hyperparameter, and hyperparameters live in the search space: --set space.{top}={raw} (one value; a JSON list searches several)"
            )
        if top not in fields:
            raise ValueError(f"--set {item!r}: unknown field {top!r}; fields: {', '.join(sorted(fields))}")
        if top == "space" and sub and not (isinstance(value, dict) and "type" in value):  # a value, not a domain
            value = (
                {"type": "Categorical", "choices": value}
                if isinstance(value, list)
                else {"type": "Fixed", "value": value}
            )
        if sub:
            current = changes.get(top, getattr(spec, top))
            if not isinstance(current, dict):
                raise ValueError(f"--set {item!r}: {top!r} is not a mapping")
            changes[top] = {**current, sub: value}
        else:
            changes[top] = value
    return dataclasses.replace(spec, **changes) if changes else spec


def _resume(args) -> dict:
    from sm2jax.hyperband import run_hyperband
    from sm2jax.spec import StudySpec
    from sm2jax.store.folder import StudyDir
    from sm2jax.study import Study

    blob = StudyDir(args.dir).spec_blob()
    if blob is not None and "hyperband" in blob:
        return run_hyperband(
            args.dir, StudySpec(**blob["hyperband"]), progress=not args.no_progress, devices=args.devices
        )
    spec = None
    if _budget(args):  # a raised (or new) budget: recorded in spec.json, it trains nothing
        from sm2jax.spec import read_spec

        spec = dataclasses.replace(read_spec(args.dir), **_budget(args))
    return Study(
        args.dir, spec, progress=not args.no_progress, devices=args.devices
    ).run()  # one-line errors for a missing or unknown spec


def _compare(args) -> int:
    from sm2jax.figures import compare_rows, compile_warning
    from sm2jax.report import load_comparable

    rows = compare_rows([load_comparable(d) for d in args.dirs])
    warning = compile_warning(rows)
    if warning:
        print(f"sm2jax: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = list(dict.fromkeys(c for r in rows for c in r))  # studies may name their metric differently
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sm2jax")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _study_arguments(p: argparse.ArgumentParser) -> None:
    """What study ``run`` and ``plan`` make: preset or config, overrides, mode, samples, folder."""
    p.add_argument(
        "--preset", choices=PRESET_NAMES, default="digits", help="a study of the paper's (default: digits, offline)"
    )
    p.add_argument("--config", help="an experiment's config.py (its get_config()); instead of --preset")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a StudySpec field (JSON value), e.g. --set max_budget=3 --set dataset_options.num_samples=2000; repeatable",
    )
    p.add_argument(
        "--mode",
        choices=("sm2", "sh", "full", "hyperband"),
        default="sm2",
        help="SM2, or a baseline on identical work",
    )
    p.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help="sample N configurations of the space, cohort-aware (Sobol'; see sm2jax.sampling), instead of its grid",
    )
    p.add_argument("--dir", help="study directory (default runs/PRESET-MODE); an existing one resumes")
    p.add_argument("--quick", action="store_true", help="a tiny version of the preset")
    p.add_argument(
        "--energy", default="auto", choices=("auto", *ENERGY_METHODS), help="how energy is obtained (default: auto)"
    )
    p.add_argument("--idle-seconds", type=float, help="idle-baseline measurement length")
    p.add_argument("--steps-per-window", type=int, help="fixed steps per energy window")
    p.add_argument("--data-dir", help="TFDS data folder of a prepared data set (see `sm2jax prepare`)")
    p.add_argument("--no-probe", action="store_true", help="skip the vmap-width probe (vmap all trials of a cohort)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.add_argument("--json", action="store_true", help="print results.json (plan: the plan) as JSON instead")


def _budget_arguments(p: argparse.ArgumentParser) -> None:
    """A study's energy and wall-time budget (``max_energy_joules``, ``max_wall_seconds``)."""
    p.add_argument(
        "--budget-kwh",
        type=float,
        metavar="KWH",
        help="the study's energy budget: no phase starts that the study predicts would exceed it; it ends with its best configuration so far",
    )
    p.add_argument("--budget-hours", type=float, metavar="H", help="the study's wall-time budget, likewise")


def _process_arguments(p: argparse.ArgumentParser) -> None:
    """How the process runs: modules to import, the compile cache, devices, several processes."""
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it registers your models, data sets or tasks); repeatable; recorded in the study",
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="persistent XLA compilation cache (default: $SM2JAX_COMPILE_CACHE, else ~/.cache/sm2jax/xla)",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train on the first N devices (default: all; a study checkpointed on N devices resumes on any number)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="on a CPU: XLA host devices of the trials axis (default: one per usable core, at most 8; ignored if XLA_FLAGS sets the count)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-process study: process 0's address (with --num-processes and --process-id, on every host)",
    )
    p.add_argument("--num-processes", type=int, metavar="N", help="multi-process study: how many processes in all")
    p.add_argument("--process-id", type=int, metavar="I", help="multi-process study: this process's rank (0..N-1)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process study on a cluster that jax.distributed.initialize() detects (TPU, SLURM)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: every subcommand and option, each with its help."""
    parser = argparse.ArgumentParser(
        prog="sm2jax", description="Energy-aware hyperparameter optimisation (SM2) for JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study (the offline digits SM2 study by default)")
    plan = sub.add_parser(
        "plan",
        help="predict a study's energy and wall time per phase before it runs (a short probe; the arguments of run)",
    )
    resume = sub.add_parser("resume", help="continue a killed study (or one a budget stopped: raise it)")
    resume.add_argument("dir")
    for p in (run, plan):
        _study_arguments(p)
    for p in (run, resume, plan):
        _budget_arguments(p)
        _process_arguments(p)
    resume.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    resume.add_argument("--json", action="store_true", help="print results.json instead of the report")
    extend = sub.add_parser(
        "extend", help="add configurations to a study, proposed by its searcher from everything it measured"
    )
    extend.add_argument("dir")
    extend.add_argument("--samples", type=int, required=True, help="how many configurations to add")
    extend.add_argument("--rounds", type=int, default=1, help="over how many rounds (each learns from the last)")
    extend.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    extend.add_argument("--json", action="store_true", help="print results.json instead of the report")
    _process_arguments(extend)
    report = sub.add_parser(
        "report", help="print a study's report (finished, or running or interrupted: its decisions so far)"
    )
    report.add_argument("dir")
    report.add_argument("--json", action="store_true", help="print the results as JSON instead")
    report.add_argument("--out", help="where the CSV tables and PNG figures go (default: DIR/report)")
    report.add_argument("--no-files", action="store_true", help="print only; write no tables or figures")
    prep = sub.add_parser("prepare", help="prepare a paper data set once (download, or an archive you place)")
    prep.add_argument("dataset", choices=("cifar10", "household_power", "wikitext2"))
    prep.add_argument("--data-dir", help="TFDS data folder (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    prep.add_argument("--manual-dir", help="folder holding the downloaded archive (default: DATA_DIR/downloads/manual)")
    prep.add_argument("--no-download", action="store_true", help="never download: use the archive in the manual folder")
    exp = sub.add_parser(
        "export", help="write a finished study's selected (or --trial) model: an Orbax checkpoint and its JSON"
    )
    exp.add_argument("dir")
    exp.add_argument("out", help="a new (or empty) folder; sm2jax.load_selected(OUT) loads it")
    exp.add_argument("--trial", type=int, metavar="N", help="a finalist's trial id instead of the selection")
    compare = sub.add_parser("compare", help="finished studies side by side (e.g. SM2 vs SH vs full on identical work)")
    compare.add_argument("dirs", nargs="+")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    for p in sub.choices.values():  # --debug after the subcommand too (absent unless given there)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def _quiet_the_noise(args) -> None:
    """Logging, Ctrl-C and SIGTERM (what SLURM, Kubernetes and `kill` send) stop a study the same
    way: what was measured is written, the checkpoints are closed, and the study resumes."""
    from sm2jax.interrupts import request_interrupt

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "compile_cache", None):
        from sm2jax.compile_cache import ENV

        os.environ[ENV] = args.compile_cache
    signal.signal(signal.SIGINT, request_interrupt)
    signal.signal(signal.SIGTERM, request_interrupt)
    if not args.debug:  # Orbax's and asyncio's threads log tracebacks of a failed save: one line says it
        for name in ("asyncio", "absl"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    default_hook = sys.unraisablehook

    # A Ctrl-C that lands in a garbage-collection callback is "ignored" by Python with a traceback;
    # the study stops at its next window instead (request_interrupt), so the traceback is noise. So
    # are the callbacks of a failed checkpoint save that reach Orbax's closed event loop: the error
    # itself is reported in one line.
    def unraisable(u):
        closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        if isinstance(u.exc_value, KeyboardInterrupt) or (closed and not args.debug):
            return
        default_hook(u)

    sys.unraisablehook = unraisable


def _start(args) -> None:
    """Before JAX starts: the CPU devices, a multi-process study, and the user's modules."""
    if args.command in ("run", "resume", "plan", "extend"):
        from sm2jax.execute.placement import request_cpu_devices

        request_cpu_devices(args.cpu_devices)  # one host device per core on a CPU
        if args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
            from sm2jax.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id)
    if args.command in ("run", "resume", "plan", "export", "extend"):  # as `python -m` does: modules next to the user
        sys.path.insert(0, os.getcwd())  # are found (a recorded one too, on resume)
    if getattr(args, "imports", None):
        from sm2jax.spec import import_modules

        import_modules(args.imports)


def _command(args) -> dict | int:
    """Runs the subcommand: the results to print, or an exit status."""
    if args.command == "run":
        return _run(args)
    if args.command == "resume":
        return _resume(args)
    if args.command == "extend":
        from sm2jax.rounds import check_extension
        from sm2jax.study import Study

        check_extension(args.samples, args.rounds)  # before the study is opened
        return Study(args.dir, progress=not args.no_progress, devices=args.devices).extend(args.samples, args.rounds)
    if args.command == "compare":
        return _compare(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "export":
        from sm2jax.handback import describe, export, load_selected

        out = export(args.dir, args.out, args.trial)
        print(f"exported {describe(load_selected(out))} to {out}")
        return 0
    if args.command == "prepare":
        from sm2jax.prepare import prepare

        where = prepare(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir, download=not args.no_download)
        print(f"{args.dataset} is prepared in {where}")
        return 0
    from sm2jax.report import load_results

    return load_results(args.dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_the_noise(args)
    from sm2jax.cohort import CohortError
    from sm2jax.interrupts import interrupt_signal
    from sm2jax.report import format_results

    try:
        _start(args)
        results = _command(args)
    except KeyboardInterrupt:
        where = getattr(args, "dir", None)
        hint = f"`sm2jax resume {where}` continues the study" if where else "`sm2jax resume DIR` continues the study"
        signum = interrupt_signal()
        print(
            f"sm2jax: {'terminated' if signum == signal.SIGTERM else 'interrupted'}; {hint} (finished phases are kept)",
            file=sys.stderr,
        )
        return 128 + signum
    except (ValueError, OSError, ImportError, KeyError, CohortError) as err:  # one line, no traceback
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"sm2jax: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    if isinstance(results, int):
        return results
    print(json.dumps(results, indent=1) if args.json else format_results(results))
    if args.command == "report" and not args.no_files:
        from sm2jax.report_files import write_report_files

        return write_report_files(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Developer and CI tasks. `bash scripts/nox.sh -s tests` runs the whole test suite.

Sessions:
  tests  Rust tests on SQLite and PostgreSQL, then the wheel built (as `wheel` builds it),
         installed and tested with pytest, then installed into a fresh virtualenv without
         building anything, where its demo runs (services from scripts/services.sh).
  wheel  the release wheel: manylinux2014 (glibc >= 2.17), abi3 (CPython >= 3.10), built
         with maturin and zig into dist/, then checked as `tests` checks it.
  lint   rustfmt and clippy (warnings are errors), with and without the Python bindings
         and the benchmarks (cargo feature `bench`); mypy --strict on the Python package.
  soak   the production layout under faults for minutes, then the data-safety invariants
         (scripts/soak.py), on the local backend and on SLURM; not run by CI, whose
         default run has a short version (tests/python/test_soak.py). Arguments after
         `--` go to scripts/soak.py, e.g. `-- --packages 5000 --stream-seconds 600`.
  fuzz   each cargo-fuzz target (fuzz/) for a bounded time on the nightly toolchain
         (`-- SECONDS`, default 60 each); a finding fails the session and leaves its
         input in fuzz/artifacts/.
  bench  performance figures beside the goals they are judged against (not run by CI;
         run it on a quiet machine): Celery publishing, then the trigger-manager;
         `-- 10000 100000` picks archive sizes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def services_env(session: nox.Session) -> dict[str, str]:
    """PostgreSQL and Redis URLs from scripts/services.sh (given ones or private servers)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "services.sh"), "up"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    session.log("services: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return env


def build_wheel(session: nox.Session) -> Path:
    """The release wheel into dist/: abi3 (one wheel for every CPython >= 3.10) and
    manylinux2014 (glibc >= 2.17), linked by zig against that old glibc, which maturin's
    compliance check then verifies; maturin and zig come from PyPI."""
    session.install("maturin>=1.9.4,<2", "ziglang")
    dist = ROOT / "dist"
    for old in dist.glob("ccat_workflow_manager-*.whl"):
        old.unlink()
    session.run(
        "maturin", "build", "--release", "--locked", "--zig",
        "--compatibility", "manylinux2014", "--out", str(dist),
    )
    (wheel,) = dist.glob("ccat_workflow_manager-*-abi3-manylinux*.whl")
    return wheel


def check_wheel(session: nox.Session, wheel: Path) -> None:
    """The wheel installs into a fresh virtualenv with nothing built (no compiler needed:
    `--only-binary :all:`), its `ccat-wfm demo` runs there to completion, and it has no
    `ccat-wfm bench`."""
    with tempfile.TemporaryDirectory(prefix="ccat-wheel-") as tmp:
        venv = Path(tmp) / "venv"
        session.run(sys.executable, "-m", "venv", str(venv), external=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        # No compiler on PATH, and no source build allowed: only wheels install.
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "CC": "/nonexistent/cc"}
        session.run(*pip, "--only-binary", ":all:", str(wheel), external=True, env=env)
        session.run(
            str(venv / "bin" / "ccat-wfm"), "demo", "--dir", str(Path(tmp) / "demo"),
            "--timeout", "300", external=True, env=env,
        )
        # The benchmarks are not in what users get.
        bench = subprocess.run(
            [str(venv / "bin" / "ccat-wfm"), "bench", "--help"],
            env=env, capture_output=True, text=True,
        )
        if bench.returncode != 2 or "unrecognized subcommand 'bench'" not in bench.stderr:
            session.error(f"the wheel's ccat-wfm has benchmarks: exit {bench.returncode}, {bench.stderr!r}")


@nox.session
def tests(session: nox.Session) -> None:
    env = services_env(session)
    # Rust: unit tests, then integration tests against both databases.
    # With the benchmarks' code (feature `bench`), which one test runs on both databases.
    session.run("cargo", "test", "--locked", "--features", "bench", external=True, env=env)
    # Python: the release wheel, built once, exactly as users get it.
    wheel = build_wheel(session)
    session.install(f"{wheel}[test]")
    session.run("pytest", "-q", *session.posargs, env=env)
    check_wheel(session, wheel)


@nox.session
def wheel(session: nox.Session) -> None:
    check_wheel(session, build_wheel(session))


@nox.session
def lint(session: nox.Session) -> None:
    session.run("cargo", "fmt", "--check", external=True)
    # The Python package, strictly typed against its stubs (pyproject.toml [tool.mypy]);
    # celery-types: Celery ships no type information of its own.
    session.install("mypy>=1.13,<2", "celery-types")
    session.run("mypy")
    for features in ([], ["--features", "bench"]):
        session.run(
            "cargo", "clippy", "--locked", "--all-targets", *features, "--", "-D", "warnings",
            external=True,
        )
    # The bindings are behind a feature; lint them too. PYO3_PYTHON points the build at
    # this session's interpreter.
    env = {"PYO3_PYTHON": os.path.join(session.bin, "python")}
    session.run(
        "cargo", "clippy", "--locked", "--features", "python", "--lib", "--", "-D", "warnings",
        external=True, env=env,
    )


@nox.session
def soak(session: nox.Session) -> None:
    env = services_env(session)
    session.install(".[test]")
    for backend in ("local", "slurm"):
        session.run("python", str(ROOT / "scripts" / "soak.py"), "--backend", backend, *session.posargs, env=env)


@nox.session
def fuzz(session: nox.Session) -> None:
    seconds = session.posargs[0] if session.posargs else "60"
    fuzz_dir = ROOT / "fuzz"
    if subprocess.run(["cargo", "+nightly", "fuzz", "--version"], capture_output=True).returncode != 0:
        session.run("cargo", "+nightly", "install", "--locked", "cargo-fuzz", external=True)
    targets = subprocess.run(
        ["cargo", "+nightly", "fuzz", "list"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for target in targets:
        corpus = fuzz_dir / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        session.run(
            "cargo", "+nightly", "fuzz", "run", target, str(corpus), str(fuzz_dir / "seeds" / target),
            "--", f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=4096",
            external=True,
        )


@nox.session
def bench(session: nox.Session) -> None:
    """Celery publishing (Rust beside Python's send_task), SLURM submission and status
    calls, then the trigger-manager on PostgreSQL at 10k, 100k and 1M packages."""
    env = services_env(session)
    session.run("cargo", "build", "--locked", "--release", "--features", "bench", external=True)
    binary = str(ROOT / "target" / "release" / "ccat-wfm")
    session.install("celery[redis]>=5.5,<6")
    session.run("python", str(ROOT / "scripts" / "bench_publish.py"), env["CCAT_TEST_REDIS_URL"], binary)
    # Output collection: the collector's SHA-256 beside sha256sum on the same files.
    session.run(binary, "bench", "checksum", external=True)
    # The SLURM backend on the test cluster: submission time and calls per status cycle.
    session.run(
        binary, "--log-level", "warn,sqlx=error", "bench", "slurm",
        external=True,
        env={
            **env,
            "SLURM_CONF": env["CCAT_TEST_SLURM_CONF"],
            "CCAT_BENCH_POSTGRES_URL": env["CCAT_TEST_POSTGRES_URL"],
        },
    )
    sizes = session.posargs or ["10000", "100000", "1000000"]
    for size in sizes:
        # One process per size, so that each reports its own peak memory.
        session.run(
            str(ROOT / "target" / "release" / "ccat-wfm"),
            "--log-level", "warn,sqlx=error",
            "bench", "trigger", "--packages", size,
            external=True,
            env={**env, "CCAT_BENCH_POSTGRES_URL": env["CCAT_TEST_POSTGRES_URL"]},
        )

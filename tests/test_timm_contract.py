"""timm's own model tests pass on FishNet: the contract of ``fishnet_pl``'s timm registration.

The test runs timm's ``tests/test_models.py``, from the sdist of the installed timm version, on fishnet99 and
fishnet150, the way timm's CI runs it (``pytest -vv --forked --durations=0 -m <marker> tests``; ``--forked``
only where pytest-forked is installed and works), with one change: the model module "fishnet" is added to
``FEAT_INTER_FILTERS`` (timm's list of modules having ``forward_intermediates``), so the intermediates tests
select our models too.

timm's code is not part of this repository: the sdist is downloaded from PyPI with pip on first use and
cached in ``~/.cache/fishnet-pl/timm-<version>/`` (``$XDG_CACHE_HOME`` or ``$FISHNET_PL_CACHE`` move it).
Each run copies the files it needs into a temporary directory and patches the copy there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("fishnet99", "fishnet150")
# timm's markers of the per-model tests below (timm >= 1.0.31 moved test_model_forward / _backward from
# "base" to their own "forward" / "backward" markers; older versions simply have no test with those).
MARKERS = "base or forward or backward or cfg or features or fxforward or fxbackward"
EXPECTED_TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_forward_features",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_model_forward_fx",
    "test_model_backward_fx",
)
RESULT_LINE = re.compile(r"^tests/test_models\.py::(\w+)\[([^\]]*)\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b",
                         re.MULTILINE)
SUBPROCESS_TIMEOUT = 900  # seconds; timm's own per-test timeouts (pytest-timeout, if installed) are 120-360 s

CONFTEST = '''\
"""Registers the FishNet variants in timm before timm's test_models.py is collected (its parametrisations
call timm.list_models() at import time)."""
import timm

import fishnet_pl  # noqa: F401

assert {MODELS!r} <= set(timm.list_models("fishnet*")), timm.list_models("fishnet*")
'''


def _cache_dir() -> Path:
    if os.environ.get("FISHNET_PL_CACHE"):
        return Path(os.environ["FISHNET_PL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fishnet-pl"


def _timm_sdist(version: str) -> Path:
    """The sdist of timm ``version``, downloaded with pip on first use, then taken from the cache."""
    cache = _cache_dir() / f"timm-{version}"
    sdist = cache / f"timm-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as download:
        cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:", "--no-deps",
               "--disable-pip-version-check", "-q", "-d", download]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(Path(download).glob("timm-*.tar.gz"))
        if proc.returncode or len(found) != 1:
            pytest.fail(f"could not download timm's sdist ({' '.join(cmd)}: exit {proc.returncode}, got "
                        f"{[p.name for p in found]}):\n{proc.stdout}\n{proc.stderr}")
        os.replace(found[0], sdist)  # atomic: concurrent runs see the whole file or none
    return sdist


def _read_members(sdist: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Text of the sdist's files ``names`` (paths below its top directory) that it has."""
    files = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            if rest in names and member.isfile():
                files[rest] = tar.extractfile(member).read().decode("utf-8")
    return files


def _prepare_run_dir(run_dir: Path, version: str) -> None:
    """timm's tests/test_models.py (patched), tests/conftest.py, tests/__init__.py and pyproject.toml (its pytest
    markers), plus a top-level conftest.py importing fishnet_pl."""
    files = _read_members(_timm_sdist(version), ("tests/test_models.py", "tests/conftest.py",
                                                 "tests/__init__.py", "pyproject.toml"))
    assert "tests/test_models.py" in files, f"timm {version}'s sdist has no tests/test_models.py"
    assert "pyproject.toml" in files, f"timm {version}'s sdist has no pyproject.toml"
    assert "[tool.pytest.ini_options]" in files["pyproject.toml"], "timm's pytest settings (markers) moved"

    # The only change to timm's tests: the module "fishnet" is one having forward_intermediates().
    source, edits = re.subn(r"^FEAT_INTER_FILTERS = \[\n", "FEAT_INTER_FILTERS = [\n    'fishnet',\n",
                            files["tests/test_models.py"], flags=re.MULTILINE)
    assert edits == 1, "FEAT_INTER_FILTERS = [ not found once in timm's tests/test_models.py"
    files["tests/test_models.py"] = source

    (run_dir / "tests").mkdir()
    for name, text in files.items():
        (run_dir / name).write_text(text, encoding="utf-8")
    (run_dir / "conftest.py").write_text(CONFTEST.format(MODELS=set(MODELS)), encoding="utf-8")


def _forked_works(probe_dir: Path) -> bool:
    """pytest-forked is installed and works with this pytest (1.7.5 cannot send pytest 9.2's reports from the
    child: each test then "EXITED with status 3"), shown on a trivial test."""
    if importlib.util.find_spec("pytest_forked") is None:
        return False
    probe_dir.mkdir()
    (probe_dir / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (probe_dir / "test_probe.py").write_text("def test_probe():\n    pass\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pytest", "-q", "--forked", "-p", "no:cacheprovider", "test_probe.py"]
    return subprocess.run(cmd, cwd=probe_dir, capture_output=True, timeout=120).returncode == 0


def timm_command(forked: bool) -> list[str]:
    """timm's CI command, restricted to fishnet99 / fishnet150 and the markers of the per-model tests."""
    return [sys.executable, "-m", "pytest", "-vv", *(["--forked"] if forked else []), "--durations=0",
            "-m", MARKERS, "-k", " or ".join(MODELS),
            "-p", "no:cacheprovider", "-c", "pyproject.toml", "--rootdir", ".", "tests"]


def _model_of(params: str) -> str | None:
    """The FishNet variant among a test id's dash-separated parameters ("1-fishnet99" -> "fishnet99"; a
    pretrained tag, as timm's default_cfgs test takes, is its model's: "1-fishnet99.in1k" -> "fishnet99")."""
    found = [p.split(".")[0] for p in params.split("-") if p.split(".")[0] in MODELS]
    return found[0] if len(found) == 1 else None


def test_timm_model_tests_pass_on_fishnet(tmp_path):
    version = importlib.metadata.version("timm")
    run_dir = tmp_path / f"timm-{version}"
    run_dir.mkdir()
    _prepare_run_dir(run_dir, version)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = timm_command(forked=_forked_works(tmp_path / "forked-probe"))
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"timm's tests did not finish in {SUBPROCESS_TIMEOUT} s: {shlex.join(cmd)}\n{out[-30000:]}")
    elapsed = time.monotonic() - start
    shell = f"(cd {shlex.quote(str(run_dir))} && {shlex.join(cmd)})"
    print(f"timm {version} model tests on {', '.join(MODELS)}: {elapsed:.1f} s\n$ {shell}\n{proc.stdout}")

    results = RESULT_LINE.findall(proc.stdout)
    ran = "\n".join(f"  {test}[{params}] {outcome}" for test, params, outcome in results)
    output = proc.stdout + proc.stderr
    context = f"\n$ {shell}  # exit {proc.returncode}, {elapsed:.0f} s\n{ran}\n{output[-30000:]}"
    assert results, f"no test results in timm's pytest output{context}"
    # -k is a substring match: every test it selected must be parametrised with exactly one of our models.
    strays = [f"{test}[{params}]" for test, params, _ in results if _model_of(params) is None]
    assert not strays, f"-k selected tests of other models: {strays}{context}"
    assert proc.returncode == 0, f"timm's model tests failed on FishNet{context}"

    passed = {(test, _model_of(params)) for test, params, outcome in results if outcome == "PASSED"}
    missing = [f"{test}[{model}]" for test in EXPECTED_TESTS for model in MODELS if (test, model) not in passed]
    assert not missing, f"expected timm tests did not pass (not run, skipped or failed): {missing}{context}"

    summary = [line for line in proc.stdout.splitlines() if re.match(r"^=+ .*\bin [\d.]+s\b", line)]
    assert summary, f"no pytest summary line{context}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary[-1])}
    assert counts.get("passed", 0) >= len(EXPECTED_TESTS) * len(MODELS), f"{summary[-1]}{context}"
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors"), summary[-1]

"""``hvobs doctor`` and the start check, on fake installations beside agent-hypervisor.

Each test builds a site directory in a temporary folder, without network: this distribution's
files (copied from the package under test) with a dist-info whose RECORD holds their hashes, and
a fake agent-hypervisor (a regular ``hypervisor/__init__.py`` and some of the shared module
files, with a RECORD of its own), installed before or after, or uninstalled (its RECORD's files
removed, as pip does). ``hvobs`` runs as a subprocess with that directory first on its path.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hypervisor.observability

PACKAGE = Path(hypervisor.observability.__file__).resolve().parent
SHARED = ("__init__.py", "causal_trace.py", "event_bus.py", "prometheus_collector.py",
          "saga_span_exporter.py")  # fmt: skip
RUN_HVOBS = "import sys; from hypervisor.observability.cli import main; sys.exit(main())"


def record_line(site: Path, path: Path) -> str:
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
    return f"{path.relative_to(site).as_posix()},sha256={digest},{len(data)}"


def dist_info(site: Path, name: str, version: str, files: list[Path]) -> Path:
    """Write ``<name>-<version>.dist-info`` with METADATA and a RECORD of ``files``."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    lines = [record_line(site, f) for f in files]
    lines += [f"{info.name}/METADATA,,", f"{info.name}/INSTALLER,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(lines) + "\n")
    return info


def install_ours(site: Path) -> None:
    """Install this distribution's files into ``site`` (as pip would, from the wheel)."""
    target = site / "hypervisor" / "observability"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    files = sorted(p for p in target.rglob("*") if p.is_file())
    dist_info(site, "hypervisor-observability", "0.1.0", files)


FOREIGN = {
    "hypervisor/__init__.py": '"""agent-hypervisor (a stand-in for the published package)."""\n',
    "hypervisor/observability/causal_trace.py": '"""the published causal_trace (stand-in)"""\n',
    "hypervisor/observability/saga_span_exporter.py": '"""the published exporter (stand-in)"""\n',
}


def install_foreign(site: Path, *, overwrite: bool = True) -> None:
    """Install the fake agent-hypervisor into ``site``; with ``overwrite=False`` the shared
    files it lists stay this distribution's (as when this one is reinstalled after it)."""
    written: list[Path] = []
    kept: dict[Path, bytes] = {}
    for relative, text in FOREIGN.items():
        path = site / relative
        if path.exists() and not overwrite:
            kept[path] = path.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    dist_info(site, "agent-hypervisor", "3.7.0", written)
    for path, data in kept.items():
        path.write_bytes(data)


def uninstall_foreign(site: Path) -> None:
    """Remove every file the fake agent-hypervisor's RECORD lists, as ``pip uninstall``."""
    info = site / "agent_hypervisor-3.7.0.dist-info"
    for line in (info / "RECORD").read_text().splitlines():
        (site / line.split(",", 1)[0]).unlink(missing_ok=True)
    info.rmdir()


def run(site: Path, *args: str, path_first: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``hvobs ARGS`` with ``site`` (and ``path_first`` before it) first on sys.path."""
    pythonpath = os.pathsep.join(str(p) for p in (path_first, site) if p is not None)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("HVOBS_REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-c", RUN_HVOBS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_clean_install_is_healthy(tmp_path: Path) -> None:
    """This distribution alone: every check passes, exit 0, and no start warning."""
    install_ours(tmp_path)
    doctor = run(tmp_path, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert str(tmp_path / "hypervisor" / "observability") in doctor.stdout
    assert "PROBLEM" not in doctor.stdout
    assert "nothing to fix" in doctor.stdout
    demo = run(tmp_path, "demo", "--agents", "1", "--sagas", "0")
    assert demo.returncode == 0
    assert demo.stderr == ""


def test_published_package_installed_over_this_one(tmp_path: Path) -> None:
    """agent-hypervisor installed after this distribution overwrote two shared files and
    added a regular hypervisor/__init__.py: the doctor names each overwritten file and its
    owner and says how to restore them (exit 1); every other command still runs, after one
    warning line naming the files and the doctor."""
    install_ours(tmp_path)
    install_foreign(tmp_path)
    doctor = run(tmp_path, "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    out = doctor.stdout
    for name in ("causal_trace.py", "saga_span_exporter.py"):
        assert f"PROBLEM  {name} is agent-hypervisor 3.7.0's copy" in out
    assert "event_bus.py" not in out.split("to fix:")[1]
    assert "pip install --force-reinstall --no-deps hypervisor-observability" in out
    assert "__init__.py is agent-hypervisor 3.7.0's" in out
    assert "Traceback" not in doctor.stderr

    demo = run(tmp_path, "demo", "--agents", "1", "--sagas", "0")
    assert demo.returncode == 0, demo.stderr
    warning = demo.stderr.splitlines()
    assert len(warning) == 1, demo.stderr
    assert "causal_trace.py, saga_span_exporter.py" in warning[0]
    assert "hvobs doctor" in warning[0]
    assert demo.stdout.startswith("hvobs demo: ")


def test_this_one_reinstalled_after_the_published_package(tmp_path: Path) -> None:
    """The adoption path: agent-hypervisor first, this distribution over it. Every shared file
    is this distribution's, so nothing is wrong (exit 0, no start warning); the doctor notes
    the shared directory and what uninstalling either would delete."""
    install_ours(tmp_path)
    install_foreign(tmp_path, overwrite=False)
    doctor = run(tmp_path, "doctor")
    assert doctor.returncode == 0, doctor.stdout
    assert "PROBLEM" not in doctor.stdout
    assert "agent-hypervisor 3.7.0 shares this directory: uninstalling it deletes" in doctor.stdout
    assert run(tmp_path, "acl", "--role", "reader", "--user", "u", "--password", "p").stderr == ""


def test_published_package_uninstalled_after_stacking(tmp_path: Path) -> None:
    """Uninstalling agent-hypervisor from the stacked layout deletes the shared files it
    listed: the doctor reports them missing and the reinstall that restores them (exit 1)."""
    install_ours(tmp_path)
    install_foreign(tmp_path, overwrite=False)
    uninstall_foreign(tmp_path)
    doctor = run(tmp_path, "doctor")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "PROBLEM  causal_trace.py is missing" in doctor.stdout
    assert "PROBLEM  saga_span_exporter.py is missing" in doctor.stdout
    assert "pip install --force-reinstall --no-deps hypervisor-observability" in doctor.stdout
    assert "restores causal_trace.py, saga_span_exporter.py" in doctor.stdout


def test_a_regular_hypervisor_package_elsewhere_hides_this_one(tmp_path: Path) -> None:
    """agent-hypervisor in a directory earlier on the path hides this distribution entirely
    (``hvobs`` cannot even import its own package then): the doctor, run as a file, finds that
    the import leads to the other directory and says so (exit 1)."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    install_ours(ours)
    theirs.mkdir()
    install_foreign(theirs)
    (theirs / "hypervisor" / "observability" / "__init__.py").write_text('"""published"""\n')
    env = {**os.environ, "PYTHONPATH": f"{theirs}{os.pathsep}{ours}"}
    doctor = subprocess.run(
        [sys.executable, str(ours / "hypervisor" / "observability" / "doctor.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert f"loads {(theirs / 'hypervisor' / 'observability').resolve()}" in doctor.stdout
    assert "makes hypervisor a regular package" in doctor.stdout
    assert "Traceback" not in doctor.stderr

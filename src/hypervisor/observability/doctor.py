"""``hvobs doctor``: is ``hypervisor.observability`` here whole, and this distribution's own?

agent-hypervisor (the published package) and this distribution both ship
``hypervisor/observability/{__init__,event_bus,causal_trace,prometheus_collector,
saga_span_exporter}.py``. pip installs them into one directory without a word: whichever was
installed last wins file by file, and uninstalling either deletes files the other needs.
agent-hypervisor also ships a regular ``hypervisor/__init__.py`` (this distribution's
``hypervisor`` is a namespace package), which makes ``hypervisor`` one directory: any other
``hypervisor`` directory on ``sys.path`` (an editable checkout of this project, another site
directory) is hidden behind it.

:func:`diagnose` finds where ``import hypervisor.observability`` leads (by walking ``sys.path``
as the import system does, without importing anything), which distribution each shared file
belongs to (a marker line in this distribution's copies; the hashes of the RECORD files of the
installed distributions), whether this distribution's files are intact (its RECORD, unless it is
an editable install), and whose ``hypervisor/__init__.py`` is there; it says what to do.
:func:`quick_check` is the cheap part ``hvobs`` runs at every start: five small file reads.

Standard library only, and nothing else of this package is imported: when ``hvobs`` itself
cannot start, ``python path/to/hypervisor/observability/doctor.py`` runs the same checks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "DISTRIBUTION",
    "MARKER",
    "SHARED_FILES",
    "Diagnosis",
    "Finding",
    "diagnose",
    "main",
    "quick_check",
    "render",
]

DISTRIBUTION: Final = "hypervisor-observability"
PUBLISHED: Final = "agent-hypervisor"
SHARED_FILES: Final = (
    "__init__.py",
    "causal_trace.py",
    "event_bus.py",
    "prometheus_collector.py",
    "saga_span_exporter.py",
)
"""The module files both distributions ship at the same path."""
MARKER: Final = '__distribution__ = "hypervisor-observability"'
"""The line every shared file of this distribution holds (and the published ones do not)."""
GUIDE: Final = 'docs/compatibility.md, "Beside agent-hypervisor"'
_OURS: Final = Path(__file__).resolve().parent
_MAX_MARKER_SEARCH: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the doctor found.

    Attributes:
        level: ``"ok"``, ``"note"`` (works, but worth knowing) or ``"problem"``.
        text: what it found, in one line.
    """

    level: str
    text: str


@dataclass(slots=True)
class Diagnosis:
    """What :func:`diagnose` found, and what to do about it.

    Attributes:
        package_dir: the directory ``import hypervisor.observability`` loads (``None``: none).
        ours_dir: this distribution's directory (where this module is).
        version: this distribution's installed version (``None``: no metadata found).
        findings: what was found, in the order checked.
        fixes: what to do, one command or step a line (empty when nothing is wrong).
    """

    package_dir: Path | None
    ours_dir: Path
    version: str | None
    findings: list[Finding] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        """The findings of level ``"problem"``."""
        return [finding for finding in self.findings if finding.level == "problem"]


def _has_marker(path: Path) -> bool | None:
    """Whether ``path`` holds :data:`MARKER` (``None``: the file is missing or unreadable)."""
    try:
        with path.open("rb") as handle:
            return MARKER.encode() in handle.read(_MAX_MARKER_SEARCH)
    except OSError:
        return None


def quick_check(package_dir: Path = _OURS) -> str | None:
    """The one-line warning ``hvobs`` prints at start when a shared module file here is not
    this distribution's (or is missing); ``None`` when all five are. Reads five small files."""
    foreign = [name for name in SHARED_FILES if not _has_marker(package_dir / name)]
    if not foreign:
        return None
    return (
        f"hvobs: warning: {', '.join(foreign)} in {package_dir} "
        f"{'is' if len(foreign) == 1 else 'are'} not hypervisor-observability's (another "
        "package, such as agent-hypervisor, was installed over it or removed it); run "
        "hvobs doctor"
    )


def _resolve(path: Sequence[str]) -> tuple[Path | None, Path | None]:
    """``(hypervisor/__init__.py if hypervisor is a regular package, the observability
    directory)`` as ``import hypervisor.observability`` would find them on ``path``."""
    portions: list[Path] = []
    regular: Path | None = None
    for entry in path:
        base = Path(entry or ".") / "hypervisor"
        if (base / "__init__.py").is_file():
            # The first regular package wins over every namespace portion, earlier ones too.
            regular = base / "__init__.py"
            portions = [base]
            break
        if base.is_dir():
            portions.append(base)
    namespace: list[Path] = []
    for base in portions:
        candidate = base / "observability"
        if (candidate / "__init__.py").is_file():
            return regular, candidate.resolve()
        if candidate.is_dir():
            namespace.append(candidate.resolve())
    return regular, namespace[0] if namespace else None


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _file_hash(path: Path) -> str | None:
    import base64
    import hashlib

    try:
        digest = hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(slots=True)
class _Installed:
    """An installed distribution's files under ``hypervisor/``: absolute path -> RECORD hash."""

    name: str
    version: str
    editable: bool
    files: dict[Path, str | None]


def _installed(path: Sequence[str]) -> list[_Installed]:
    """Every distribution on ``path`` that installed files under ``hypervisor/``."""
    # Imported here: the start check (quick_check) runs on every hvobs start and needs neither.
    import importlib.metadata
    import json

    found: list[_Installed] = []
    seen: set[str] = set()
    for dist in importlib.metadata.distributions(path=list(path)):
        name = _normal(dist.metadata["Name"] or "")
        if not name or name in seen:
            continue  # a later copy on the path is shadowed by the first, as for imports
        seen.add(name)
        files: dict[Path, str | None] = {}
        for item in dist.files or ():
            if item.parts and item.parts[0] == "hypervisor":
                where = Path(str(dist.locate_file(item))).resolve()
                files[where] = item.hash.value if item.hash is not None else None
        editable = False
        direct = dist.read_text("direct_url.json")
        if direct:
            try:
                editable = bool(json.loads(direct).get("dir_info", {}).get("editable"))
            except (ValueError, AttributeError):
                editable = False
        if files or name == _normal(DISTRIBUTION):
            found.append(_Installed(name, dist.version, editable, files))
    return found


def _owner(path: Path, installed: Iterable[_Installed], ours: str) -> str | None:
    """``name version`` of the installed distribution whose RECORD has this very file (its
    hash matches), ``None`` if none (this distribution excluded)."""
    digest = _file_hash(path)
    for dist in installed:
        if dist.name != ours and path in dist.files and dist.files[path] == digest:
            return f"{dist.name} {dist.version}"
    return None


def _listed(path: Path, installed: Iterable[_Installed], ours: str) -> list[str]:
    """``name version`` of every other distribution that lists ``path`` in its RECORD."""
    return [f"{d.name} {d.version}" for d in installed if d.name != ours and path in d.files]


def diagnose(path: Sequence[str] | None = None, ours_dir: Path = _OURS) -> Diagnosis:
    """Check the installation of ``hypervisor.observability`` on ``path`` (``sys.path``).

    Args:
        path: the import path to check (the running interpreter's by default).
        ours_dir: this distribution's ``hypervisor/observability`` directory.
    """
    path = list(sys.path if path is None else path)
    ours_name = _normal(DISTRIBUTION)
    regular, package_dir = _resolve(path)
    installed = _installed(path)
    mine = next((d for d in installed if d.name == ours_name), None)
    diagnosis = Diagnosis(package_dir, ours_dir, None if mine is None else mine.version)
    add = diagnosis.findings.append
    fixes = diagnosis.fixes
    reinstall = (
        "pip install --no-deps -e <your checkout>  (an editable install)"
        if mine is not None and mine.editable
        else f"pip install --force-reinstall --no-deps {DISTRIBUTION}"
    )

    # 1. Where the import leads.
    if package_dir is None:
        add(Finding("problem", "import hypervisor.observability finds nothing on sys.path"))
        fixes.append(reinstall)
    elif package_dir != ours_dir:
        why = (
            f": {regular} makes hypervisor a regular package, which hides every other "
            "hypervisor directory on sys.path"
            if regular is not None and regular.parent != ours_dir.parent
            else ""
        )
        owner = None if regular is None else _owner(regular, installed, ours_name)
        add(
            Finding(
                "problem",
                f"import hypervisor.observability loads {package_dir}, not this "
                f"distribution's {ours_dir}{why}" + (f" (it belongs to {owner})" if owner else ""),
            )
        )
        fixes.append(
            "use one environment per distribution, or install this distribution into the "
            f"same site directory after the other one: {reinstall}"
        )
    else:
        add(Finding("ok", f"import hypervisor.observability loads {ours_dir}"))

    # 2. Whose shared files are in this distribution's directory.
    foreign: list[str] = []
    for name in SHARED_FILES:
        file = ours_dir / name
        marked = _has_marker(file)
        if marked is None:
            listed = _listed(file.resolve(), installed, ours_name)
            gone = f" (removed with {', '.join(listed)}?)" if listed else ""
            add(Finding("problem", f"{name} is missing{gone}"))
            foreign.append(name)
        elif not marked:
            owner = _owner(file.resolve(), installed, ours_name)
            whose = f"{owner}'s copy" if owner else "not this distribution's copy"
            add(Finding("problem", f"{name} is {whose}, installed over this distribution's"))
            foreign.append(name)
    if foreign:
        fixes.append(f"{reinstall}  (restores {', '.join(foreign)})")
    else:
        add(Finding("ok", f"{', '.join(SHARED_FILES)} are this distribution's"))

    # 3. This distribution's other files, against its RECORD (an editable install has none).
    if mine is not None and not mine.editable:
        changed = [
            p
            for p, digest in mine.files.items()
            if p.name not in SHARED_FILES
            and p.suffix == ".py"
            and digest is not None
            and _file_hash(p) != digest
        ]
        if changed:
            names = ", ".join(sorted(str(p.relative_to(ours_dir.parent.parent)) for p in changed))
            add(Finding("problem", f"files changed or missing since install: {names}"))
            if not foreign:
                fixes.append(reinstall)
    elif mine is None:
        add(Finding("note", f"no {DISTRIBUTION} metadata on sys.path (running from a checkout?)"))

    # 4. Other distributions in this directory, and a regular hypervisor/__init__.py.
    init = ours_dir.parent / "__init__.py"
    # Other distributions with files in this directory, and which files (pip deletes them all
    # when that distribution is uninstalled, whoever wrote them last).
    others = {
        f"{d.name} {d.version}": (d.name, sorted(p.name for p in d.files if p.parent == ours_dir))
        for d in installed
        if d.name != ours_name and any(p.parent == ours_dir for p in d.files)
    }
    if init.is_file():
        owner = _owner(init.resolve(), installed, ours_name) or next(
            iter(_listed(init.resolve(), installed, ours_name)), None
        )
        if owner is None:
            add(
                Finding(
                    "problem",
                    f"{init} belongs to no installed distribution: it makes hypervisor a "
                    "regular package and hides other hypervisor directories",
                )
            )
            fixes.append(f"delete {init}")
        else:
            add(
                Finding(
                    "note",
                    f"{init} is {owner}'s: hypervisor is a regular package here, so other "
                    "hypervisor directories on sys.path are hidden",
                )
            )
    for label, (other, here) in sorted(others.items()):
        add(
            Finding(
                "note",
                f"{label} shares this directory: uninstalling it deletes {', '.join(here)} "
                f"(then: {reinstall}); uninstalling {DISTRIBUTION} deletes them for {other} "
                f"(then: pip install --force-reinstall --no-deps {other})",
            )
        )
    if (foreign or others or init.is_file()) and diagnosis.problems:
        fixes.append(f"see {GUIDE}")
    return diagnosis


_LABELS: Final = {"ok": "ok     ", "note": "note   ", "problem": "PROBLEM"}


def render(diagnosis: Diagnosis) -> str:
    """The doctor's report: a heading, one line per finding, then what to do."""
    version = diagnosis.version or "(no metadata)"
    lines = [f"hvobs doctor: {DISTRIBUTION} {version} in {diagnosis.ours_dir}"]
    lines += [f"  {_LABELS[f.level]}  {f.text}" for f in diagnosis.findings]
    if diagnosis.fixes:
        lines.append("to fix:")
        lines += [f"  {fix}" for fix in diagnosis.fixes]
    else:
        lines.append("nothing to fix")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the diagnosis; exit status 1 when it found a problem, else 0."""
    del argv  # no options
    diagnosis = diagnose()
    print(render(diagnosis))
    return 1 if diagnosis.problems else 0


if __name__ == "__main__":
    # Run as a file (``python .../doctor.py``), when ``hvobs`` cannot import its package.
    sys.exit(main())

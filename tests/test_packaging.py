"""How the package is declared: what each part imports, the version, the typing marker.

The optimizer library (everything but :mod:`kldwrm.experiments`) must run with torch alone;
every third-party import anywhere in the repository must be declared in ``pyproject.toml``,
since CI installs only what is declared.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kldwrm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "kldwrm"
#: the parts of the package that make up the optimizer library (DESIGN section 2)
LIBRARY = [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts]
OWN = {"kldwrm", "tests", "benchmarks", "examples", "conftest"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path`` (also those inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n not in OWN}


def _declared() -> dict[str, set[str]]:
    """``{distribution name: extras it is declared in}`` from pyproject.toml (core: "")."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, set[str]] = {}
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    for extra, reqs in groups.items():
        for req in reqs:
            name = re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0].lower().replace("_", "-")
            out.setdefault(name, set()).add(extra)
    return out


def test_optimizer_library_imports_only_torch_and_the_standard_library():
    assert LIBRARY, "no library modules found"
    for path in LIBRARY:
        extra = _third_party(_imports(path)) - {"torch"}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"


def test_import_kldwrm_loads_nothing_beyond_torch():
    """At run time too: the modules ``import kldwrm`` adds after ``import torch``."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import kldwrm, kldwrm.optim.qe, kldwrm.reference, kldwrm.divergence, "
        "kldwrm.distributed, kldwrm.curvature\n"
        "kldwrm.KFAC, kldwrm.QEKLDWRM\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(n for n in new if n not in sys.stdlib_module_names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['kldwrm']"


def test_every_third_party_import_is_declared():
    declared = _declared()
    dist_of = md.packages_distributions()
    undeclared = {}
    for folder in ("src", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                continue  # a local venv (e.g. the peers' benchmark venv), not our code
            for name in _third_party(_imports(path)):
                dists = {d.lower().replace("_", "-") for d in dist_of.get(name, [name])}
                if not dists & declared.keys():
                    undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imports not declared in pyproject.toml: {undeclared}"


def test_dependencies_as_a_library_declares_them():
    declared = _declared()
    core = {d for d, extras in declared.items() if "" in extras}
    assert core == {"torch"}
    assert {"numpy", "tqdm", "matplotlib"} <= {
        d for d, extras in declared.items() if "experiments" in extras
    }
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all("==" not in d for d in deps), f"a library does not pin exactly: {deps}"
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d", pins, re.M), "constraints.txt must pin torch exactly"


def test_version_is_kept_in_one_place():
    assert kldwrm.__version__ == md.version("kldwrm")
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_typed_marker_ships_with_the_package():
    assert (Path(kldwrm.__file__).parent / "py.typed").is_file()


def test_cli_without_the_experiments_extra_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['tqdm'] = None\n"
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'tqdm' else real(n, *a)\n"
        "from kldwrm.experiments.cli import main\n"
        "sys.exit(main(['report', '.']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "kldwrm: error: the command line needs the experiments extra (missing: tqdm); "
        "install it with: pip install 'kldwrm[experiments]'"
    )

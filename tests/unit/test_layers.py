"""The package's shape: one `llmbatch` namespace, imports that only run down the layers, no import cycles."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import llmbatch
import llmbatch.cluster
import llmbatch.jobs
import llmbatch.pipelines

REPO = Path(__file__).resolve().parents[2]
# A layer may import itself and the layers after it in this list, never one before it (DESIGN.md: jobs ->
# cluster -> pipelines -> the shared root).
LAYERS = ["llmbatch.jobs", "llmbatch.cluster", "llmbatch.pipelines", "llmbatch"]


def modules() -> dict[str, Path]:
    found = {}
    for package in (llmbatch, llmbatch.jobs, llmbatch.pipelines, llmbatch.cluster):
        folder = Path(package.__file__).parent
        for path in folder.glob("*.py"):
            name = package.__name__ if path.stem == "__init__" else f"{package.__name__}.{path.stem}"
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every llmbatch module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


SUBPACKAGES = ("llmbatch.jobs", "llmbatch.pipelines", "llmbatch.cluster")


def package_of(module: str) -> str:
    if module in SUBPACKAGES:
        return module
    parent = module.rsplit(".", 1)[0]
    return parent if parent in SUBPACKAGES else "llmbatch"


def layer_of(module: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if package_of(module) in layer.split("|"))


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_every_import_runs_down_the_layers():
    wrong = []
    for module, imported in graph().items():
        for target in imported:
            here, there = package_of(module), package_of(target)
            if here == there:
                continue
            if layer_of(target) <= layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports that run up or across a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("llmbatch", "jobs", "cluster", "pipelines"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
                   check=True, capture_output=True)
    return next(out.glob("llmbatch-*.whl"))


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"llmbatch", next(t for t in tops if t.endswith(".dist-info"))}
    for expected in ("llmbatch/errors.py", "llmbatch/jobs/cli.py", "llmbatch/jobs/quickstart.yaml",
                     "llmbatch/jobs/data/quickstart.jsonl", "llmbatch/pipelines/columns.py",
                     "llmbatch/cluster/families.yaml"):
        assert expected in names


def test_a_users_pipelines_and_jobs_packages_live_beside_it(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    for name in ("pipelines", "jobs", "cluster"):
        (target / name).mkdir()
        (target / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    check = ("import pipelines, jobs, cluster\n"
             "assert (pipelines.OWNER, jobs.OWNER, cluster.OWNER) == ('user pipelines', 'user jobs', 'user cluster')\n"
             "import llmbatch.pipelines.read, llmbatch.jobs.spec, llmbatch.cluster.resources\n"
             f"assert llmbatch.jobs.spec.__file__.startswith({str(target)!r}), llmbatch.jobs.spec.__file__\n"
             "print('both')\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "both"


def test_cluster_submission_ships_the_whole_package():
    from llmbatch.jobs.remote import shipped_package

    with shipped_package() as folder:
        root = Path(folder)
        assert root.name == "llmbatch"
        for expected in ("__init__.py", "errors.py", "storage.py", "jobs/cli.py", "jobs/quickstart.yaml",
                         "pipelines/columns.py", "cluster/resources.py", "cluster/families.yaml"):
            assert (root / expected).is_file(), expected
        assert not list(root.rglob("__pycache__"))
    assert not root.exists()


def test_no_two_test_files_share_a_name():
    """pytest imports test files by their bare name (the test folders are not packages): a second file of the
    same name stops collection of the whole suite."""
    names = [path.name for path in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []

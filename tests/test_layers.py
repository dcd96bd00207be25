"""The house in layers: which package may import which, and what runs without torch.

Each package of the library may import only the packages LAYERS lists for it, at the top of a module or inside a
function alike, and none imports a root script (train.py, plot.py, sweep.py, hubconf.py, main_*.py,
load_data_*.py): the scripts at the root, bench/ and tests/ sit on top and may import any package. The reports
import no torch and no model code, so `python plot.py results/` runs where torch is not installed.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
from test_plot import make_run

from conftest import REPO_ROOT
from runfolder import declarations
from training import flags, recording

# Which project packages each package may import: the layers, bottom up.
LAYERS = {
    "core": set(),  # errors, exit codes and the command wrapper; the course's recipe and report figures
    "model": set(),  # the networks and their registry (names, families, learning rates)
    "cifar": {"core"},  # the dataset files and the batches made from them
    "runfolder": {"core"},  # the run folder as a file format: declarations, atomic writes, TensorBoard events
    "reports": {"core", "runfolder"},  # summaries, figures and HTML pages, from run folders alone
    "training": {"core", "cifar", "runfolder", "model", "reports"},  # the training loop's parts
    "serving": {"core", "cifar", "runfolder", "model", "reports", "training"},  # trained networks and predictions
    "sweeps": {"core", "runfolder", "reports", "training"},  # many runs: plan, workers, status, SLURM arrays
}
# Packages whose modules import no torch at their top: plot.py imports them (and model's registry) only.
TORCH_FREE_AT_IMPORT = ("core", "runfolder", "reports")
ROOT_SCRIPTS = {path.stem for path in REPO_ROOT.glob("*.py")}
PACKAGES = {path.parent.name for path in REPO_ROOT.glob("*/__init__.py")}
# Folders of scripts that are not packages of the library (bench/, tests/): nothing in the library imports them.
SCRIPT_FOLDERS = {path.parent.name for path in REPO_ROOT.glob("*/*.py")} - PACKAGES


def imports_in(path: Path):
    """(line, module, at the top) of every absolute import of a file, inside functions too; a relative import
    stays in its package."""
    tree = ast.parse(path.read_text())
    in_functions = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) not in in_functions
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module, id(node) not in in_functions


def forbidden_arrows(package: str, path: Path) -> list[str]:
    arrows = []
    for line, module, _ in imports_in(path):
        target = module.split(".")[0]
        where = f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
        if target in ROOT_SCRIPTS:
            arrows.append(f"{where} (a root script)")
        elif target in SCRIPT_FOLDERS:
            arrows.append(f"{where} (a script folder)")
        elif target in PACKAGES and target != package and target not in LAYERS[package]:
            allowed = ", ".join(sorted(LAYERS[package])) or "no other package"
            arrows.append(f"{where} ({package} may import {allowed})")
    return arrows


def test_every_package_of_the_library_has_its_layer():
    assert PACKAGES == set(LAYERS)
    assert all(names <= set(LAYERS) for names in LAYERS.values())


def test_no_package_imports_a_layer_above_or_beside_it_or_a_root_script():
    arrows = [arrow for package in LAYERS for path in sorted((REPO_ROOT / package).rglob("*.py"))
              for arrow in forbidden_arrows(package, path)]
    assert not arrows, "imports against the layers:\n" + "\n".join(arrows)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_itself_through_others():
    """The layers rule out cycles between packages; within a package, and between the root scripts, none either
    (an import cycle breaks as soon as the modules' order of use changes)."""
    files = [*REPO_ROOT.glob("*.py"), *(path for package in LAYERS for path in (REPO_ROOT / package).rglob("*.py"))]
    modules = {module_name(path): path for path in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:  # the top of the module: what runs on import
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                            else node.module for alias in node.names}
        graph[name] = {target for target in targets if target in modules and target != name}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(name == target or (name not in seen and reaches(name, target, seen | {name}))
                   for name in graph[start])

    cycles = [name for name in graph if reaches(name, name, {name})]
    assert not cycles, f"import cycles through {cycles}"


def test_the_reports_and_what_they_read_import_no_torch_at_their_top():
    found = [f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
             for package in TORCH_FREE_AT_IMPORT for path in sorted((REPO_ROOT / package).rglob("*.py"))
             for line, module, at_top in imports_in(path)
             if at_top and module.split(".")[0] in ("torch", "torchvision")]
    assert not found, "imported at the top, where plot.py needs no torch:\n" + "\n".join(found)


def test_the_report_shows_the_flags_training_declares_as_reported():
    """The reports read the list from the run folder's declarations (they import no training code); the flags
    declare each flag's role. One list, written in two places: they must agree."""
    assert declarations.REPORTED_FLAGS == flags.REPORTED_FLAGS


NO_TORCH = """import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTorch())
"""


@pytest.fixture
def without_torch(tmp_path, monkeypatch):
    """Python processes started from here on where `import torch` fails, as where torch is not installed."""
    folder = tmp_path / "no_torch"
    folder.mkdir()
    # A finder that refuses torch, as an absent package is refused: ModuleNotFoundError, and nothing in sys.modules
    # (a None there would also trip scipy, which looks for a torch module in sys.modules to recognise its tensors).
    (folder / "sitecustomize.py").write_text(NO_TORCH)
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return folder


def test_plot_py_writes_every_summary_figure_and_page_without_torch(tmp_path, without_torch):
    """plot.py draws nothing from a checkpoint (confusion_matrix.png is --eval-only's), so no torch."""
    results = tmp_path / "results"
    for dataset, models in (("cifar10", ("cnn_base", "cnn_resnet18", "my_net")), ("cifar100", ("cnn_vgg11",))):
        for model in models:
            make_run(results / dataset, model)
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
    assert "ImportError" in check.stderr or "ModuleNotFoundError" in check.stderr
    for target in (results, results / "cifar10" / "cnn_base"):
        done = subprocess.run([sys.executable, "plot.py", str(target)], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    for dataset in ("cifar10", "cifar100"):
        for name in ("summary.md", "summary.csv", "comparison.png", "index.html"):
            assert (results / dataset / name).stat().st_size > 0
    assert (results / "index.html").is_file()
    assert (results / "cifar10" / "cnn_base" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_draws_its_curves_in_a_process_without_torch(tmp_path, without_torch):
    """The drawing process of a run imports the figures alone: starting it costs no torch import."""
    run_dir = make_run(tmp_path / "cifar10", "cnn_base")
    drawer = recording.CurvesDrawer()
    assert drawer.draw(run_dir)
    assert drawer.close() is None
    assert (run_dir / declarations.CURVES_FILE).read_bytes()[:4] == b"\x89PNG"

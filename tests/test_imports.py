"""models/ depends on nothing of the rest of the project: its files import only each other and outside libraries,
never utils/, tools/, tests/ or a script at the root; no project import hides inside a function; and its modules form no
import cycle. Read from the source with ast, nothing imported.

Every models/*.py is checked (models/ has no subpackage: the CPU kernels are the package cpu_kernels/ beside it, which
models/ never imports).
"""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
# the project's own packages and folders other than models/ (the optional cpu_kernels too); the scripts at the root are added per repository
OTHER_PROJECT_PACKAGES = {'utils', 'tools', 'tests', 'cpu_kernels'}   # cpu_kernels converts models; they never import it


def root_scripts(repo: Path) -> Set[str]:
    """Module names of the scripts at the repository root (train, sample, dist, ...)."""
    return {p.stem for p in repo.glob('*.py')}


def _imported(node: ast.AST, package: str, modules: Set[str]) -> List[str]:
    """Absolute names of what an import statement imports; `from . import x` names the module x where the package has
    a module or subpackage x, else the package itself."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        base = node.module or ''
    else:   # relative: every models/*.py is a module directly in the package
        base = '.'.join(filter(None, [package, node.module]))
    if node.module is None or node.level == 0 and base == package:
        subs = [f'{base}.{a.name}' for a in node.names if a.name in modules]
        return subs + ([base] if len(subs) < len(node.names) else [])
    return [base]


def _function_imports(tree: ast.Module) -> List[ast.AST]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def check_package(folder: Path, repo: Path) -> Tuple[List[str], Dict[str, Set[str]]]:
    """(problems, import graph {module: the package's modules it imports}) of the .py files directly in `folder`."""
    package = folder.name
    files = {p.stem for p in folder.glob('*.py') if p.stem != '__init__'}
    subpackages = {p.parent.name for p in folder.glob('*/__init__.py')}
    outside = OTHER_PROJECT_PACKAGES | (root_scripts(repo) - {package})
    problems, graph = [], {}
    for path in sorted(folder.glob('*.py')):
        name = package if path.stem == '__init__' else f'{package}.{path.stem}'
        tree = ast.parse(path.read_text(encoding='utf-8'), str(path))
        in_functions = {id(n) for n in _function_imports(tree)}
        graph[name] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            where = (str(path.relative_to(repo)), node.lineno)
            for target in _imported(node, package, files | subpackages):
                top = target.split('.')[0]
                if top in outside:
                    problems.append((*where, f'imports {target}: {package}/ must not depend on the rest of the project'))
                mine = top == package
                if mine and (target == package or target.split('.')[1] in files):
                    graph[name].add(target if target == package else '.'.join(target.split('.')[:2]))
                if id(node) in in_functions and (mine or top in outside):
                    problems.append((*where, f'imports {target} inside a function: imports of the project go at the top'))
    return [f'{file}:{line} {what}' for file, line, what in sorted(problems)], graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of the graph as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}   # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_models_imports_only_itself_and_outside_libraries():
    problems, graph = check_package(REPO / 'models', REPO)
    assert not problems, '\n'.join(problems)
    assert {'models', 'models.config', 'models.pretrained', 'models.var'} <= set(graph)
    assert 'models.config' in graph['models.build'] and 'models.var' in graph['models.build']


def test_models_modules_form_no_import_cycle():
    _, graph = check_package(REPO / 'models', REPO)
    cycle = find_cycle(graph)
    assert cycle is None, 'import cycle in models/: ' + ' -> '.join(cycle)


@pytest.fixture
def bad_package(tmp_path):
    """A repository with a script, utils/ and a package `pkg` that breaks every rule once."""
    (tmp_path / 'train.py').write_text('')
    (tmp_path / 'utils').mkdir()
    pkg = tmp_path / 'pkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('from .a import A\n')
    (pkg / 'a.py').write_text('import torch\nfrom .b import B\nA = 1\n')
    (pkg / 'b.py').write_text('from pkg import c\nB = 2\n')
    (pkg / 'c.py').write_text('from . import a\n\ndef f():\n    from .b import B\n    import json\n    return B\n')
    (pkg / 'd.py').write_text('from utils.cli import UserError\nimport train\n')
    return tmp_path, pkg


def test_the_checks_find_each_kind_of_problem(bad_package):
    repo, pkg = bad_package
    problems, graph = check_package(pkg, repo)
    assert graph == {'pkg': {'pkg.a'}, 'pkg.a': {'pkg.b'}, 'pkg.b': {'pkg.c'}, 'pkg.c': {'pkg.a', 'pkg.b'}, 'pkg.d': set()}
    assert problems == ['pkg/c.py:4 imports pkg.b inside a function: imports of the project go at the top',
                        'pkg/d.py:1 imports utils.cli: pkg/ must not depend on the rest of the project',
                        'pkg/d.py:2 imports train: pkg/ must not depend on the rest of the project']
    assert find_cycle(graph) == ['pkg.a', 'pkg.b', 'pkg.c', 'pkg.a']
    assert find_cycle({'pkg': {'pkg.a'}, 'pkg.a': set()}) is None

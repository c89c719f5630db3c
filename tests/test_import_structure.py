"""The package's structure: the layers docs/architecture.md draws, sealed methods, paths.

Reads every module's imports with `ast` (imports inside functions too) and
checks that no import reaches up a layer, that the imports have no cycle,
and that a method's folder is imported by nothing outside it: the registry
finds a method by its folder name at run time. The names of a workdir's
files are spelled in workdir/paths.py alone.
"""

import ast
import os

import pytest

PACKAGE = 'twostage_jax'
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Layers from the bottom; a module belongs to the layer of its longest prefix.
LAYERS = (
    # 0: foundations, which know no method and no training loop.
    ('workdir', 'runtime', 'data', 'synthesis', 'models', 'training.precision',
     'training.schedules', 'evaluation.metrics', 'evaluation.report'),
    # 1: what a method builds its networks, objectives and steps from.
    ('losses', 'training.network_state', 'training.train_step'),
    # 2: the methods and their registry.
    ('methods',),
    # 3: the machinery that runs any method.
    ('training', 'inference', 'evaluation', 'config_validation'),
    # 4: the entry points.
    ('cli', ''),
)


def _modules() -> dict[str, str]:
  """Dotted name (without the package) -> file, for every module of the package."""
  modules = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        modules[dotted.removesuffix('__init__').rstrip('.')] = path
  return modules


MODULES = _modules()


def _imports(path: str) -> set[str]:
  """The package modules a file imports (as dotted names without the package)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == PACKAGE:
      base = node.module.removeprefix(PACKAGE).lstrip('.')
      for alias in node.names:
        name = f'{base}.{alias.name}'.lstrip('.')
        found.add(name if name in MODULES else base)
    elif isinstance(node, ast.Import):
      found.update(a.name.removeprefix(PACKAGE).lstrip('.') for a in node.names
                   if a.name.split('.')[0] == PACKAGE)
  return found


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def layer(module: str) -> int:
  best, best_length = None, -1
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      matches = not prefix or module == prefix or module.startswith(prefix + '.')
      if matches and len(prefix) > best_length:
        best, best_length = index, len(prefix)
  return best


def method_folder(module: str) -> str | None:
  """'two_stage' for 'methods.two_stage.refine'; None outside a method's folder."""
  parts = module.split('.')
  if len(parts) >= 2 and parts[0] == 'methods' and os.path.isdir(os.path.join(ROOT, *parts[:2])):
    return parts[1]
  return None


def test_the_graph_was_read():
  assert {'cli', 'methods', 'methods.two_stage.method', 'training.train',
          'inference.engine'} <= set(MODULES)
  assert 'methods.two_stage.refine' in GRAPH['methods.two_stage.method']


def test_no_import_reaches_up_a_layer():
  upward = [f'{m} (layer {layer(m)}) imports {t} (layer {layer(t)})'
            for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m)]
  assert not upward, '\n'.join(upward)


def test_a_methods_folder_is_imported_from_inside_it_alone():
  leaks = [f'{m} imports {t}' for m, targets in GRAPH.items() for t in targets
           if method_folder(t) and method_folder(t) != method_folder(m)]
  assert not leaks, '\n'.join(leaks)


def test_the_imports_have_no_cycle():
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for target in sorted(GRAPH.get(module, ())):
      if state.get(target) == 'open':
        pytest.fail('import cycle: ' + ' -> '.join(path[path.index(target):] + [target]))
      if target not in state:
        visit(target, path + [target])
    state[module] = 'done'

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [module])


# Names of a workdir's files and folders (workdir/paths.py).
WORKDIR_NAMES = ('config.json', '.lock', '.lock.takeover', 'checkpoints', 'thresholds.json',
                 'metrics.jsonl', 'tensorboard', 'eval', 'predictions')


def test_workdir_paths_are_spelled_in_one_module():
  spelled = []
  for module, path in MODULES.items():
    if module == 'workdir.paths':
      continue
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Constant) and node.value in WORKDIR_NAMES:
        spelled.append(f'{module}:{node.lineno} {node.value!r}')
  assert not spelled, '\n'.join(spelled)


@pytest.mark.parametrize('module, expected', [
    ('methods.two_stage.refine', 2), ('training.train', 3), ('training.precision', 0),
    ('cli', 4), ('', 4), ('evaluation.metrics', 0), ('evaluation.evaluate', 3)])
def test_layers_are_read_from_the_longest_prefix(module, expected):
  assert layer(module) == expected

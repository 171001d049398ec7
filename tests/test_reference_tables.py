"""The reference tables in the docs match the code.

``docs/guide/usage.md`` lists every public function and type with its full
signature; ``docs/api.md`` lists every name with its docstring's first line.
"""

import ast
import inspect
import pathlib
import re

import pytest

import optax_graddrop as ogd

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Type aliases: no signature and no docstring of their own.
ALIASES = {"Keep", "KeepFn"}


def _resolve(name):
  obj = ogd
  for part in name.split("."):
    obj = getattr(obj, part)
  return obj


def _first_cells(path):
  """The first cell of every Markdown table row, without the header rows."""
  cells = []
  for line in path.read_text().splitlines():
    if line.startswith("| ") and not line.startswith(("| function |", "| name |", "|---")):
      cells.append(line.split(" | ")[0][2:])
  return cells


def _documented_calls():
  """``{name: (parameters, defaults)}`` from the backticked calls of usage.md's tables."""
  calls = {}
  for cell in _first_cells(ROOT / "docs" / "guide" / "usage.md"):
    for call in re.findall(r"`([\w.]+\(.*?\))`", cell):
      name, params = re.fullmatch(r"([\w.]+)\((.*)\)", call).groups()
      tree = ast.parse(f"def f({params}): pass").body[0].args
      positional = tree.posonlyargs + tree.args
      defaults = dict(zip([a.arg for a in positional][::-1], tree.defaults[::-1]))
      defaults |= {a.arg: d for a, d in zip(tree.kwonlyargs, tree.kw_defaults) if d is not None}
      assert name not in calls, f"{name} has two rows"
      calls[name] = (
        [(a.arg, "positional") for a in positional] + [(a.arg, "keyword") for a in tree.kwonlyargs],
        {arg: ast.literal_eval(node) for arg, node in defaults.items()},
      )
  return calls


def _signature(obj):
  if inspect.isclass(obj) and hasattr(obj, "__dataclass_fields__"):  # a Linen module
    signature = inspect.signature(obj)
    drop = {"parent", "name"}
  elif inspect.isclass(obj) and not hasattr(obj, "_fields"):  # an NNX module
    signature = inspect.signature(obj.__init__)
    drop = {"self"}
  else:
    signature, drop = inspect.signature(obj), set()
  params = [p for p in signature.parameters.values() if p.name not in drop]
  kinds = [
    (p.name, "keyword" if p.kind is inspect.Parameter.KEYWORD_ONLY else "positional")
    for p in params
  ]
  defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
  return kinds, defaults


PUBLIC = [
  *sorted(n for n in ogd.__all__ if not inspect.ismodule(getattr(ogd, n)) and n not in ALIASES),
  "nnx.GradDrop",
  "linen.GradDrop",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_usage_tables_give_every_signature(name):
  calls = _documented_calls()
  assert name in calls, f"docs/guide/usage.md has no row for {name}(...)"
  assert calls[name] == _signature(_resolve(name)), f"the row of {name} is out of date"


def test_usage_tables_name_only_public_functions():
  assert set(_documented_calls()) <= set(PUBLIC)


def _api_names():
  text = (ROOT / "docs" / "api.md").read_text()
  blocks = re.findall(r"\.\. autosummary::\n(.*?)```", text, flags=re.S)
  return [line.strip() for block in blocks for line in block.splitlines()[1:] if line.strip()]


def _markdown(rst):
  """A docstring line in Markdown: ``x`` and :role:`~a.b.x` become `x`."""
  rst = re.sub(r":\w+:`~[\w.]*?(\w+)`", r"`\1`", rst)
  rst = re.sub(r":\w+:`([^`]+)`", r"`\1`", rst)
  return rst.replace("``", "`")


def test_api_summary_lists_every_name_with_its_docstring():
  rows = {}
  for line in (ROOT / "docs" / "api.md").read_text().splitlines():
    match = re.fullmatch(r"\| `([\w.]+)` \| (.*) \|", line)
    if match:
      rows[match.group(1)] = match.group(2)
  names = _api_names()
  assert sorted(rows) == sorted(names)
  for name in names:
    obj = _resolve(name)
    own_doc = inspect.ismodule(obj) or getattr(obj, "__module__", "").startswith("optax_graddrop")
    if own_doc:
      assert rows[name] == _markdown(inspect.getdoc(obj).splitlines()[0]), name

"""The documentation covers the public API, and its links resolve."""

import pathlib
import re

import optax_graddrop as ogd
from optax_graddrop import problems

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _api_entries():
  text = (ROOT / "docs" / "api.md").read_text()
  blocks = re.findall(r"\.\. autosummary::\n(.*?)```", text, flags=re.S)
  return {line.strip() for block in blocks for line in block.splitlines()[1:] if line.strip()}


def test_every_public_name_has_an_api_entry():
  expected = set(ogd.__all__) | {f"problems.{name}" for name in problems.__all__}
  expected |= {"nnx.GradDrop", "linen.GradDrop"}
  entries = _api_entries()
  assert expected <= entries, sorted(expected - entries)
  assert not {e for e in entries if not e.startswith(("nnx", "linen", "problems"))} - set(
    ogd.__all__
  )


def test_relative_links_in_readme_and_docs_resolve():
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
  for page in pages:
    if "_build" in page.parts:
      continue
    for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
      if target.startswith(("http://", "https://", "mailto:")):
        continue
      resolved = (page.parent / target).resolve()
      # Links to the executed notebooks point at the copies the docs build makes.
      if "_notebooks" in resolved.parts:
        resolved = ROOT / "notebooks" / resolved.name
      assert resolved.exists(), f"{page.relative_to(ROOT)} links to missing {target}"

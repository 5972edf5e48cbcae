"""The wheel holds every package of the source tree (an editable install finds a forgotten one anyway; a real
install, as the forced-AVX2 lane and users make, does not: `electra-fast` then fails at import)."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_package_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, base)
                found.add(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
    # electra_fast's walk also passes through nothing named kernels (kernels/ lives at the root)
    assert found == listed, (f"missing from pyproject.toml: {sorted(found - listed)}; "
                             f"listed without a package: {sorted(listed - found)}")

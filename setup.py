"""Package discovery for the design's layout: `backends/`, `kernels/` and `configs/` are top-level folders that
install as `r1cli.backends`, `r1cli.kernels` and `r1cli.configs`. They are namespace folders (no __init__.py) so
that, with the repository root on sys.path, they never hide PyPI packages of the same names (transformers >= 5.25
imports `kernels`); r1cli/__init__.py finds them in a checkout. Every subpackage under those folders is found
here, so a new one cannot be left out of a wheel; the rest of the metadata is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

FOLDERS = {"r1cli.backends": "backends", "r1cli.kernels": "kernels", "r1cli.configs": "configs"}

packages, package_dir = ["r1cli"] + [f"r1cli.{p}" for p in find_packages("r1cli")], {"r1cli": "r1cli"}
for name, folder in FOLDERS.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"])]

data = {p: ["*.yaml"] for p in packages if p.startswith("r1cli.configs")} | {"r1cli": ["py.typed"]}  # PEP 561: typed
setup(packages=packages, package_dir=package_dir, package_data=data)

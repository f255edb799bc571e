"""The shipped search spaces: one YAML file per sweep, data and no code (`catrs tune NAME`).

This folder installs as the package `catrs.search_spaces` (pyproject.toml maps it there), so an installed
catrs finds its spaces with `importlib.resources`; this file only marks it as that package.
"""

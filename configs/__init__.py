"""Configs shipped with the package (read with ``importlib.resources.files("hybrid.configs")``)."""

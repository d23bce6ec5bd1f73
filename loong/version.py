"""Loong's version string (one place; `loong.__version__` and the servers read it).
Must not import anything."""
__version__ = "0.1.0"

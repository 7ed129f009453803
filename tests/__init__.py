"""The test suite (a package, so that tests/conftest.py is one module, tests.conftest, wherever it is imported from)."""

import pytest

# A helper module whose asserts are the tests' own checks: rewritten like a test module's for pytest's messages.
pytest.register_assert_rewrite("tests.errors_shared")

"""What the family x strategy matrix records per cell, for the README table (integration/test_readme_table.py)."""

import pytest

CELL_FACTS = pytest.StashKey[dict]()
"""(family, strategy) -> what test_matrix.py's cell run found (4-bit and adapted layers)."""
CELL_OUTCOMES = pytest.StashKey[dict]()
"""(family, strategy) -> whether each of that cell's tests passed (setup included)."""

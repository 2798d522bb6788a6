"""The image carries the weight-based engines the way the Makefile installs them (infra/docker/Dockerfile).

No Docker daemon is needed: the Dockerfile's instructions are read as text and compared with the
Makefile's recipe, so the two cannot drift apart silently.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def _joined(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines))


def test_image_installs_the_sam_extra_and_sam2_like_the_makefile() -> None:
    docker = _joined(DOCKERFILE.read_text())
    makefile = (ROOT / "Makefile").read_text()
    assert "['optional-dependencies']['sam']" in docker, "the 'sam' extra's requirements are installed"
    make_sam2 = re.search(
        r"SAM2_BUILD_CUDA=0 \S+ install .*--no-deps --no-build-isolation sam2==([\d.]+)", makefile
    )
    assert make_sam2, "the Makefile's sam2 recipe changed: update this test and the Dockerfile together"
    args = dict(re.findall(r"(?m)^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text()))
    assert args["SAM2_VERSION"] == make_sam2.group(1)
    assert re.search(
        r'SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation "sam2==\$\{SAM2_VERSION\}"', docker
    )
    assert "ensure_torchvision(); import segment_anything, sam2" in docker, "the build proves both import"


def test_pip_check_exception_is_the_makefiles() -> None:
    docker = _joined(DOCKERFILE.read_text())
    assert "requires torchvision, which is not installed" in docker
    assert re.search(r"! grep -v .*pip-check\.txt", docker), "any other broken requirement fails the build"

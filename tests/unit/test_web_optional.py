"""Without the ``web`` extra the core, the CLI and the stages import and run; the
viewer and ``arroyo web`` say in one line what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoWeb(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("aiohttp", "plotly"):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoWeb())
    import arroyo.control.cli, arroyo.runtime.process, arroyo.io.viewer, stages.reduce
    from arroyo.errors import ConfigError
    from arroyo.io.viewer import LiveViewer

    try:
        LiveViewer(port=0).setup()
    except ConfigError as e:
        print("viewer:", e)
    try:
        arroyo.control.cli.main(["web", sys.argv[1]], standalone_mode=False)
    except SystemExit as e:
        print("web exit:", e.code)
    """
)


def test_without_the_web_extra(tmp_path: Path) -> None:
    topo = ROOT / "deploy" / "demo.ini"
    result = subprocess.run(
        [sys.executable, "-c", CODE, str(topo)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "viewer: the web pages need the 'web' extra" in result.stdout
    assert "web exit: 2" in result.stdout
    assert "pip install 'arroyo[web]'" in result.stderr
    assert "Traceback" not in result.stderr

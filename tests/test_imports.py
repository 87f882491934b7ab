"""The package imports cleanly: no circular import, whichever module comes first, and the
output side (``prefsynth mix``) never pulls in the executor, the backends or the pipeline."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_every_module_imports_first() -> None:
    proc = _python("""
        import importlib, pkgutil, sys
        import prefsynth
        names = sorted(m.name for m in pkgutil.walk_packages(prefsynth.__path__, "prefsynth."))
        bad = []
        for name in names:
            for loaded in [m for m in sys.modules if m.startswith("prefsynth")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as e:
                bad.append(f"{name}: {type(e).__name__}: {e}")
        print(len(names))
        print("\\n".join(bad))
    """)
    assert proc.returncode == 0, proc.stderr
    count, *bad = proc.stdout.strip().split("\n")
    assert int(count) > 30 and bad == []


def test_mixture_imports_no_executor_backend_or_pipeline() -> None:
    proc = _python("""
        import sys
        import prefsynth.output.mixture
        print(" ".join(m for m in sys.modules if m.startswith(
            ("prefsynth.core.executor", "prefsynth.backends", "prefsynth.core.pipeline"))))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""

"""The suite's own set-up (conftest.py): caches in a private folder, and CI's rule that installs are not skipped."""

import os
import subprocess
import sys
from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def test_skips_for_want_of_an_install_fail_under_ci(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile("""
        import pytest

        def test_fortunes():
            pytest.skip("the fortunes corpus is missing; `apt-get install fortunes` to run this test")

        @pytest.mark.skipif(True, reason="Debian dataset-fashion-mnist not installed")
        def test_fashion():
            pass

        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_cuda():
            pass
    """)
    monkeypatch.delenv("VAELAB_REQUIRE_PACKAGES", raising=False)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(skipped=3)
    monkeypatch.setenv("VAELAB_REQUIRE_PACKAGES", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, errors=1, skipped=1)  # (a skipif fails at set-up); no CUDA still passes
    result.stdout.fnmatch_lines(["*skipped where .ci/run installs what it needs*apt-get install fortunes*"])


def test_caches_are_written_to_the_sessions_private_folder():
    """matplotlib's font cache, inductor's kernels and the temporary folders of subprocesses (torchrun's
    torchelastic_* folders) were left in HOME and /tmp after every run of the suite."""
    import matplotlib
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = Path(os.environ["VAELAB_DATA"]).parent
    assert root.name.startswith("vaelab-tests-")  # (under TMPDIR, which may lie under HOME on a cluster)
    assert Path(matplotlib.get_configdir()).is_relative_to(root) and Path(cache_dir()).is_relative_to(root)
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True)
    assert Path(child.stdout.strip()).is_relative_to(root)

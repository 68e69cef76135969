"""vaelab.system: denormals flushed on every thread while training, and restored afterwards; the CPU read once."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import tiny_config, tiny_data

from vaelab import system
from vaelab.system import flush_denormals
from vaelab.train import Trainer, train

x86 = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero flags")


def denormals_kept() -> int:
    """How many of 2^20 denormals survive a product: the elements are split among all intra-op threads."""
    tiny = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)  # 1.4e-45 each
    return int((tiny * 1.0 != 0).sum())


@pytest.fixture
def two_threads():
    """Two intra-op threads whose pool already exists, as in any process that has done some work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.randn(512, 512) @ torch.randn(512, 512)
    yield
    torch.set_num_threads(threads)


@x86
def test_every_thread_flushes_inside_and_none_after(two_threads):
    assert denormals_kept() == 1 << 20
    with flush_denormals() as everywhere:
        assert everywhere
        assert denormals_kept() == 0  # the worker's half too: torch.set_flush_denormal alone leaves it
    assert denormals_kept() == 1 << 20


@x86
def test_calling_thread_alone_is_not_enough(two_threads):
    """Why the pool is visited: workers keep the flags they were created with."""
    torch.set_flush_denormal(True)
    try:
        kept = denormals_kept()
    finally:
        torch.set_flush_denormal(False)
    assert 0 < kept < 1 << 20  # the fixture's two threads: the caller's half flushed, the worker's kept


@x86
def test_flushing_asked_for_before_is_extended_to_the_pool_and_kept(two_threads):
    torch.set_flush_denormal(True)
    try:
        with flush_denormals() as everywhere:
            assert everywhere and denormals_kept() == 0
        assert system._flushes_denormals()  # the caller's own setting stays
    finally:
        torch.set_flush_denormal(False)
        system._on_every_thread(lambda: torch.set_flush_denormal(False))
    assert denormals_kept() == 1 << 20


@x86
def test_training_steps_run_with_denormals_flushed(tmp_path, two_threads, monkeypatch):
    seen = []
    original = Trainer._epoch

    def epoch(self, n):
        seen.append(denormals_kept())
        return original(self, n)

    monkeypatch.setattr(Trainer, "_epoch", epoch)
    train(tiny_config(epochs=2), tmp_path / "run", dataset=tiny_data(), progress=False)
    assert seen == [0, 0]
    assert denormals_kept() == 1 << 20


@x86
def test_without_a_reachable_pool_only_the_calling_thread_flushes(two_threads, monkeypatch):
    """Another OpenMP runtime or parallel backend: the flags are set where possible and said to be partial."""
    monkeypatch.setattr(system.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(TypeError("no CDLL(None)")))
    with flush_denormals() as everywhere:
        assert not everywhere and system._flushes_denormals()
    assert not system._flushes_denormals()


@x86
def test_a_context_left_open_does_not_hang_the_interpreter_at_exit():
    """Closed by the garbage collector at shutdown, the restore must not wait for pool threads that exited."""
    script = textwrap.dedent("""
        import torch
        from vaelab.system import flush_denormals
        torch.set_num_threads(2)
        torch.ones(1 << 20).mul(2)  # the pool exists
        context = flush_denormals()
        print(context.__enter__())
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter hung at exit restoring the pool's denormal flags")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_cpu_info_reads_the_first_processor_and_falls_back_to_the_vendor_alone(monkeypatch):
    """One reader of the CPU for vaelab.linear's default and the benchmarks' results (each read /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        vendor = re.search(r"^vendor_id\s*:\s*(.*)$", cpuinfo.read_text(), re.M)
        assert system.cpu_info().get("vendor") == (vendor.group(1).strip() if vendor else None)

    def unreadable(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr("builtins.open", unreadable)
    monkeypatch.setattr(system.platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel")
    assert system.cpu_info() == {"vendor": "GenuineIntel"}
    monkeypatch.setattr(system.platform, "processor", lambda: "")
    assert system.cpu_info() == {}

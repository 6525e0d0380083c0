"""The kernel build cache's fallback in the shared temp dir (issue 29, item 9): whoever
owns or can write $TMPDIR/approxdist-<uid> chooses the library load() imports, so it is
created 0700 and used only when it is this uid's own, unwritable by others."""
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import approxdist.kernels as K
from approxdist.kernels import loader

OTHER_UID = 65534  # nobody
REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def no_home_cache(tmp_path, monkeypatch):
    """A cache root that cannot be created (a path below a regular file, which stops even
    root) and a temp dir of the test's own; returns the fallback path."""
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    monkeypatch.delenv("APPROXDIST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp / f"approxdist-{os.getuid()}"


def test_fallback_is_created_private(no_home_cache):
    path = loader.cache_dir("tag")
    assert path == no_home_cache / "tag" and path.is_dir()
    st = os.lstat(no_home_cache)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert loader.cache_dir("tag") == path  # the second call trusts its own directory


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_another_users_world_writable_dir_is_refused(no_home_cache):
    no_home_cache.mkdir(mode=0o777)
    os.chmod(no_home_cache, 0o777)
    os.chown(no_home_cache, OTHER_UID, OTHER_UID)
    with pytest.raises(RuntimeError, match=rf"{no_home_cache}.*uid {OTHER_UID}.*APPROXDIST_CACHE_DIR"):
        loader.cache_dir("tag")
    assert not (no_home_cache / "tag").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_another_users_private_dir_is_refused(no_home_cache):
    no_home_cache.mkdir(mode=0o700)
    os.chown(no_home_cache, OTHER_UID, OTHER_UID)
    with pytest.raises(RuntimeError, match=f"uid {OTHER_UID}"):
        loader.cache_dir("tag")


def test_own_dir_writable_by_others_is_refused(no_home_cache):
    no_home_cache.mkdir()
    os.chmod(no_home_cache, 0o777)
    with pytest.raises(RuntimeError, match="mode 777"):
        loader.cache_dir("tag")


def test_a_link_is_refused(no_home_cache, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    no_home_cache.symlink_to(target)
    with pytest.raises(RuntimeError, match="not a directory"):
        loader.cache_dir("tag")


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_load_falls_back_to_torch_with_one_warning_and_builds_nothing(no_home_cache, monkeypatch):
    no_home_cache.mkdir()
    os.chmod(no_home_cache, 0o777)
    os.chown(no_home_cache, OTHER_UID, OTHER_UID)
    builds = []

    class FakeCppExtension:
        CUDA_HOME = None

        @staticmethod
        def load(**kwargs):
            builds.append(kwargs)

    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})
    monkeypatch.setattr(loader, "_import_cpp_extension", lambda: FakeCppExtension)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert K.backend() == "torch"
    messages = [str(w.message) for w in caught if "approxdist" in str(w.message)]
    assert len(messages) == 1 and "APPROXDIST_CACHE_DIR" in messages[0], messages
    assert builds == []


# -- a prebuilt cache this process cannot write (issue 31: non-root containers) ----------
READ_ONLY_PROBE = """
import warnings
warnings.simplefilter("always")
import approxdist.kernels as K
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(K.backend())
    print(K.loader.load().__file__)
print(len([w for w in caught if "approxdist" in str(w.message)]))
"""


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None,
                    reason="a read-only bind mount needs root and util-linux's unshare/mount")
def test_a_read_only_prebuilt_cache_is_used_as_it_is(tmp_path, monkeypatch):
    """The image's cache (APPROXDIST_CACHE_DIR, built as root at image build) seen by a
    container user who cannot write it, here as a read-only mount (Apptainer's image is
    one): the prebuilt library loads, with no rebuild and no fallback warning."""
    monkeypatch.delenv("APPROXDIST_KERNELS", raising=False)
    monkeypatch.setattr(loader, "_state", {"tried": False, "ext": None})
    built = loader.load()  # this machine's own cache: built once, then found
    if built is None:
        pytest.skip("the C++ kernels do not build here (no compiler): nothing prebuilt to load")
    lib = Path(built.__file__)
    cache = tmp_path / "image-cache"
    shutil.copytree(lib.parent, cache / lib.parent.name)
    script = (f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache} && "
              f"! touch {cache}/probe 2>/dev/null && exec {sys.executable} -c '{READ_ONLY_PROBE}'")
    env = dict(os.environ, APPROXDIST_CACHE_DIR=str(cache), PYTHONPATH=REPO)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend, path, warned = proc.stdout.split()
    assert backend == "cpp" and path == str(cache / lib.parent.name / lib.name) and warned == "0", proc.stdout
    assert sorted(p.name for p in (cache / lib.parent.name).iterdir()) == sorted(p.name for p in lib.parent.iterdir())

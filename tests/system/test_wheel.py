"""The wheel ships everything: every subpackage, py.typed, the twistd plugin
and every entry point.

An editable install hides what the wheel leaves out (the 0.1.0 wheel had no
C{twisted_mailout/contrib/}, so the documented Django backend path was
missing). So this builds the wheel from a clean copy of the source (a
C{build/} left in the work tree would leak stale modules into it), installs
it, not editable, into a fresh virtual environment that cannot see this
interpreter's site-packages (its dependencies come from pip's index and
cache, with the C{django}, C{transaction}, C{zope} and C{pyramid} extras
(every contrib module then imports), and pytest for the
plugin), and there:

  - compares the wheel's modules with the source's, and imports every one;
  - runs the C{mailout} script and C{twistd mailout --help} (the twistd
    plugin in the C{twisted.plugins} namespace, which has no C{__init__.py});
  - loads the C{pytest11} entry point, and sees pytest list its fixture;
  - sends a message through C{twisted_mailout.contrib.django.EmailBackend}
    into a queue folder.

Every step has a time limit; the environment is built once for the module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# What goes into the wheel, and nothing else, is copied (no build/, no caches).
SOURCE_ITEMS = ["pyproject.toml", "README.md", "LICENSE", "twisted_mailout", "twisted"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "dropin.cache", "*.egg-info")


def clean_env() -> dict[str, str]:
    """This environment without anything that would put the work tree or
    this interpreter's packages on the venv's path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(cmd: list[str], *, timeout: float, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """Run C{cmd}; fail the test with its output when it exits non-zero."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, cwd=cwd,
                       env=clean_env(), **kw)
    assert r.returncode == 0, (cmd, (r.stdout + r.stderr).decode(errors="replace")[-4000:])
    return r


def source_modules(src: Path) -> set[str]:
    """C{twisted_mailout/**.py} paths (POSIX, relative to C{src}) of the source copy."""
    return {p.relative_to(src).as_posix() for p in (src / "twisted_mailout").rglob("*.py")}


class Installed:
    """The built wheel and the fresh virtual environment it is installed in."""

    def __init__(self, root: Path):
        self.root = root
        self.src = root / "src"
        self.dist = root / "dist"
        self.venv = root / "venv"
        self.wheel: Path | None = None

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.venv / "bin" / name

    def py(self, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run C{code} with the venv's interpreter, from a folder with no sources in it."""
        return run([self.python, "-c", textwrap.dedent(code), *args], timeout=timeout,
                   cwd=self.root)


def build_backend_available() -> bool:
    """Whether this interpreter's setuptools can build a wheel without an
    isolated build environment (setuptools >= 70.1 has bdist_wheel; before,
    the C{wheel} package provides it)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from importlib.metadata import version

    major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    inst = Installed(tmp_path_factory.mktemp("wheel"))
    inst.src.mkdir()
    for item in SOURCE_ITEMS:
        path = ROOT / item
        if path.is_dir():
            shutil.copytree(path, inst.src / item, ignore=IGNORE)
        elif path.exists():
            shutil.copy2(path, inst.src / item)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", inst.dist, inst.src]
    if build_backend_available():
        build.insert(5, "--no-build-isolation")
    # Otherwise pip builds in an isolated environment with the setuptools
    # pyproject.toml asks for, from the index (cached).
    run(build, timeout=300, cwd=inst.root)
    [inst.wheel] = inst.dist.glob("twisted_mailout-*.whl")
    run([sys.executable, "-m", "venv", inst.venv], timeout=120, cwd=inst.root)
    run([inst.python, "-m", "pip", "install", f"{inst.wheel}[django,transaction,zope,pyramid]",
         "pytest"],
        timeout=600, cwd=inst.root)
    return inst


def test_the_wheel_holds_every_module_the_plugin_and_py_typed(installed):
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
    shipped = {n for n in names if n.startswith("twisted_mailout/") and n.endswith(".py")}
    missing = source_modules(installed.src) - shipped
    extra = shipped - source_modules(installed.src)
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"
    assert not extra, f"stale modules in the wheel: {sorted(extra)}"
    assert "twisted_mailout/contrib/django.py" in names  # review F4
    assert "twisted_mailout/py.typed" in names
    # data files the code reads: the shaping presets, the API document, the page
    assert {"twisted_mailout/delivery/presets.toml", "twisted_mailout/daemon/openapi.json",
            "twisted_mailout/daemon/static/index.html"} <= names
    assert "twisted/plugins/mailout_plugin.py" in names
    # Twisted's namespace stays Twisted's: no __init__.py of ours, no cache file
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py",
                "twisted/plugins/dropin.cache"} & names
    others = {n.split("/")[0] for n in names} - {"twisted_mailout", "twisted"}
    assert len(others) == 1 and others.pop().endswith(".dist-info"), names  # no tests/, docs/


def test_every_installed_module_imports_from_the_venv(installed):
    r = installed.py("""
        import importlib, json, pathlib, sys, traceback
        import twisted_mailout
        root = pathlib.Path(twisted_mailout.__file__).parent
        names = []
        for p in sorted(root.rglob("*.py")):
            parts = list(p.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
        names.append("twisted.plugins.mailout_plugin")
        failed = {}
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:
                failed[name] = traceback.format_exc(limit=3)
        print(json.dumps({"file": twisted_mailout.__file__, "prefix": sys.prefix,
                          "path": sys.path, "modules": names, "failed": failed,
                          "typed": (root / "py.typed").is_file()}))
    """)
    info = json.loads(r.stdout)
    assert info["failed"] == {}, "\n".join(info["failed"].values())
    # the installed copy, not the work tree or an editable install
    assert Path(info["file"]).is_relative_to(installed.venv), info["file"]
    assert not any(Path(p).resolve() == ROOT for p in info["path"] if p), info["path"]
    assert info["typed"]
    expected = {p.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                for p in source_modules(installed.src)}
    assert set(info["modules"]) >= expected


def test_the_mailout_script_runs(installed):
    r = run([installed.script("mailout"), "--help"], timeout=60, cwd=installed.root)
    out = r.stdout.decode()
    assert "sendmail" in out and "queue" in out, out


def test_twistd_finds_the_mailout_plugin(installed):
    r = run([installed.script("twistd"), "mailout", "--help"], timeout=120, cwd=installed.root)
    out = r.stdout.decode()
    assert "--queue" in out, out
    r = run([installed.script("twistd"), "--help"], timeout=120, cwd=installed.root)
    assert "mailout" in r.stdout.decode()


def test_the_pytest_plugin_entry_point_loads_and_gives_its_fixture(installed):
    r = installed.py("""
        import json
        from importlib.metadata import entry_points
        [ep] = [e for e in entry_points(group="pytest11") if e.name == "twisted_mailout"]
        module = ep.load()
        print(json.dumps({"value": ep.value, "module": module.__name__,
                          "fixture": callable(getattr(module, "mail_outbox", None))}))
    """)
    assert json.loads(r.stdout) == {"value": "twisted_mailout.testing",
                                    "module": "twisted_mailout.testing", "fixture": True}
    tests = installed.root / "plugin_check"
    tests.mkdir(exist_ok=True)
    (tests / "test_outbox.py").write_text(textwrap.dedent("""
        from twisted_mailout import Mailer

        def test_capture(mail_outbox):
            Mailer("null://").send(b"From: a@example.org\\nTo: b@example.org\\n\\nhi\\n")
            assert [m.recipients for m in mail_outbox] == [["b@example.org"]]
    """))
    r = run([installed.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_outbox.py"],
            timeout=120, cwd=tests)
    assert b"1 passed" in r.stdout, r.stdout


def test_the_documented_django_backend_queues_mail(installed):
    queue = installed.root / "django-queue"
    r = installed.py("""
        import json, sys
        import django
        from django.conf import settings
        settings.configure(EMAIL_BACKEND="twisted_mailout.contrib.django.EmailBackend",
                           MAILOUT_DELIVERY="queue://" + sys.argv[1],
                           DEFAULT_FROM_EMAIL="shop@example.org")
        django.setup()
        from django.core.mail import get_connection, send_mail
        from twisted_mailout.contrib.django import EmailBackend
        n = send_mail("Order 1", "Thanks.", None, ["buyer@example.org"])
        print(json.dumps({"sent": n, "backend": type(get_connection()).__module__,
                          "class": EmailBackend.__name__}))
    """, str(queue))
    assert json.loads(r.stdout) == {"sent": 1, "backend": "twisted_mailout.apps.django",
                                    "class": "EmailBackend"}
    queued = [p for p in queue.rglob("*") if p.is_file() and p.parent.name in ("new", "messages")]
    assert len(queued) == 1, sorted(queue.rglob("*"))
    assert b"buyer@example.org" in queued[0].read_bytes()

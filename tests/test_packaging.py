"""What users install: one version everywhere, and every module importable from the package."""

from __future__ import annotations

import importlib
import pkgutil
import re
from importlib.metadata import entry_points, version
from pathlib import Path

import kqueue

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_has_one_source_and_the_changelog_names_it() -> None:
    # Given the version in kqueue/__init__.py, the installed metadata and the changelog's newest entry
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)

    # Then all three agree
    assert newest is not None
    assert version("kqueue") == kqueue.__version__ == newest.group(1)


def test_every_module_of_the_package_imports() -> None:
    # When every module under kqueue is imported from wherever kqueue is installed
    names = [m.name for m in pkgutil.walk_packages(kqueue.__path__, "kqueue.")]
    for name in names:
        importlib.import_module(name)

    # Then the subpackages the commands need are among them
    assert {"kqueue.cli.send", "kqueue.cli.work", "kqueue.worker.loop", "kqueue.sqlite"} <= set(names)


def test_the_web_page_s_templates_and_scripts_are_installed() -> None:
    # Given the kqueue.web package, wherever it is installed
    from importlib.resources import files

    web = files("kqueue.web")

    # Then the page's templates, its style and htmx are there beside it
    assert {"page.html", "queues.html", "dead_list.html"} <= {f.name for f in web.joinpath("templates").iterdir()}
    assert {"htmx.min.js", "kqueue.css"} <= {f.name for f in web.joinpath("static").iterdir()}


def test_each_command_entry_point_loads() -> None:
    commands = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("kqueue")}

    assert set(commands) == {"kqueue", "kqueue-send", "kqueue-work"}
    for ep in commands.values():
        assert callable(ep.load())

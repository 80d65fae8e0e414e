"""Projects and workspaces, laid out as Forgather lays them out.

The project of a config is the nearest directory at or above it holding ``meta.yaml``; its workspace
root is the nearest directory at or above the project holding a ``forgather_workspace/`` folder.
``meta.yaml`` is itself a template, rendered with the search path [project dir,
``<workspace root>/forgather_workspace``, the user's ``<forgather config dir>/templates`` when it
exists] and the globals ``project_dir`` and ``workspace_root``, to a mapping with ``searchdir``,
``name``, ``description``, ``config_prefix`` and ``default_config``.

A config NAME of a project is found as Forgather finds it: ``<searchdir>/<config_prefix>/NAME`` for
each search directory in order, the first that exists; fgc also looks in ``<project>/<config_prefix>``
last (the layout of fgc's own projects, which need no searchdir).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import FgcError, Location, display_path
from .environment import PathStr
from .templates import LIBRARY_DIR


def forgather_config_dir() -> str:
    """The user's Forgather configuration directory (``~/.config/forgather`` on Linux)."""
    from platformdirs import user_config_dir

    return user_config_dir("forgather")


META = "meta.yaml"
WORKSPACE = "forgather_workspace"


@dataclass
class Project:
    """A project directory and what its ``meta.yaml`` says."""

    dir: Path
    workspace_root: Path | None
    searchdir: list[Path]
    config_prefix: str = "configs"
    name: str | None = None
    description: str | None = None
    default_config: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def config_dirs(self) -> list[Path]:
        """Where the project's configs are, first match wins: each searchdir's config_prefix folder,
        then the project's own."""
        dirs = [d / self.config_prefix for d in self.searchdir] + [self.dir / self.config_prefix]
        return list(dict.fromkeys(dirs))

    def config_path(self, name: str) -> Path | None:
        """The file of config NAME (``adamw.yaml``, ``sub/x.yaml``), or None."""
        for d in self.config_dirs:
            if (d / name).is_file():
                return d / name
        return None

    def globals(self) -> dict:
        """``project_dir``, and ``workspace_root`` when there is a workspace."""
        out = {"project_dir": PathStr(self.dir)}
        if self.workspace_root:
            out["workspace_root"] = PathStr(self.workspace_root)
        return out

    def config_names(self) -> list[str]:
        """The name of every config of the project (YAML files under its config folders; a name
        found in two folders is the first folder's), in name order."""
        names: set[str] = set()
        for d in self.config_dirs:
            if d.is_dir():
                names.update(p.relative_to(d).as_posix() for p in d.rglob("*.yaml") if not _hidden(p, d))
        return sorted(names)

    def configs(self) -> list[Path]:
        """The file of every config of the project, in name order."""
        return [self.config_path(name) for name in self.config_names()]

    def first_config(self) -> str | None:
        """The config ``-p DIR`` picks without a name: ``default_config``, else (as Forgather) the
        first config found."""
        if self.default_config:
            return self.default_config
        names = self.config_names()
        return names[0] if names else None


def _hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def find_project_dir(start: Path) -> Path | None:
    """The nearest directory at or above START that holds meta.yaml."""
    start = start.resolve()
    for d in [start, *start.parents]:
        if (d / META).is_file():
            return d
    return None


def find_workspace_root(project_dir: Path) -> Path | None:
    for d in [project_dir, *project_dir.parents]:
        if (d / WORKSPACE).is_dir():
            return d
    return None


def load_project(project_dir: Path) -> Project:
    """Render and read a project's meta.yaml."""
    from .render import render_file  # render imports this module

    project_dir = project_dir.resolve()
    meta_path = project_dir / META
    if not meta_path.is_file():
        raise FgcError(f"not a project: no {META}", Location(str(project_dir)))
    workspace = find_workspace_root(project_dir)
    search = [project_dir] + ([workspace / WORKSPACE] if workspace else [])
    user_templates = Path(forgather_config_dir()) / "templates"
    if user_templates.is_dir():
        search.append(user_templates)
    context = {"project_dir": PathStr(project_dir)}
    if workspace:
        context["workspace_root"] = PathStr(workspace)
    rendered = render_file(meta_path, search, context)
    try:
        data = yaml.safe_load(rendered.text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = rendered.location(mark.line) if mark else Location(str(meta_path))
        raise FgcError(f"YAML: {getattr(exc, 'problem', exc)}", loc) from None
    data = data or {}
    if not isinstance(data, dict):
        raise FgcError(f"{META} must render to a mapping", Location(str(meta_path)))
    searchdir = data.get("searchdir", [str(project_dir / "templates")])
    if isinstance(searchdir, str):
        searchdir = [searchdir]
    if not isinstance(searchdir, list) or not all(isinstance(s, str) for s in searchdir):
        raise FgcError("searchdir must be a list of directories", Location(str(meta_path)))
    return Project(
        dir=project_dir,
        workspace_root=workspace,
        searchdir=[(project_dir / s).resolve() for s in searchdir],
        config_prefix=str(data.get("config_prefix", "configs")),
        name=data.get("name"),
        description=data.get("description"),
        default_config=data.get("default_config"),
        meta=data,
    )


@dataclass
class ConfigSource:
    """A config file, its project (if any) and its template search path."""

    path: Path
    search_path: list[Path]
    project: Project | None = None

    def globals(self) -> dict:
        return self.project.globals() if self.project else {}  # undefined outside a project


def resolve_config(
    config: str | Path | None, include_dirs=(), project_dir: str | Path | None = None
) -> ConfigSource:
    """Find CONFIG (a file path, or with ``-p DIR`` a config name in that project) and its search path.

    Search path, first match wins: the config's own directory, each ``-I`` directory, the project's
    ``searchdir`` list, fgc's built-in template library.
    """
    includes = [Path(d).resolve() for d in include_dirs]
    if project_dir is not None:
        project = load_project(Path(project_dir))
        name = config or project.first_config()
        if not name:
            raise FgcError(
                "no config named and the project has none",
                Location(str(project.dir / META)),
                hint="searched: " + ", ".join(display_path(str(d)) for d in project.config_dirs),
            )
        path = project.config_path(str(name))
        if path is None:
            raise FgcError(
                f"no config {str(name)!r} in project {project.dir}",
                Location(str(project.dir / META)),
                hint="configs: " + (", ".join(project.config_names()) or "none")
                + "; searched: " + ", ".join(display_path(str(d)) for d in project.config_dirs),
            )
    else:
        if config is None:
            raise FgcError("no config given", Location("<command line>"))
        path = Path(config)
        if not path.is_file():
            what = "the config is a directory" if path.is_dir() else "no such config file"
            raise FgcError(what, Location(str(path)))
        project_root = find_project_dir(path.resolve().parent)
        project = load_project(project_root) if project_root else None
    path = path.resolve()
    search = [path.parent, *includes, *(project.searchdir if project else []), LIBRARY_DIR]
    unique = list(dict.fromkeys(search))
    return ConfigSource(path, unique, project)

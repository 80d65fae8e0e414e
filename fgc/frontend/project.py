"""Projects and workspaces, laid out as Forgather lays them out.

The project of a config is the nearest directory at or above it holding ``meta.yaml``; its workspace
root is the nearest directory at or above the project holding a ``forgather_workspace/`` folder.
``meta.yaml`` is itself a template, rendered with the search path [project dir,
``<workspace root>/forgather_workspace``] and the globals ``project_dir`` and ``workspace_root``, to a
mapping with ``searchdir``, ``name``, ``description``, ``config_prefix`` and ``default_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import FgcError, Location
from .templates import LIBRARY_DIR

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
    def config_dir(self) -> Path:
        return self.dir / self.config_prefix

    def globals(self) -> dict:
        """``project_dir``, and ``workspace_root`` when there is a workspace."""
        out = {"project_dir": str(self.dir)}
        if self.workspace_root:
            out["workspace_root"] = str(self.workspace_root)
        return out

    def configs(self) -> list[Path]:
        """Every config of the project: YAML files under its config directory."""
        if not self.config_dir.is_dir():
            return []
        return sorted(p for p in self.config_dir.rglob("*.yaml") if not _hidden(p, self.config_dir))


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
    context = {"project_dir": str(project_dir)}
    if workspace:
        context["workspace_root"] = str(workspace)
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
        name = config or project.default_config
        if not name:
            raise FgcError(
                "no config named and the project has no default_config",
                Location(str(project.dir / META)),
            )
        path = project.config_dir / str(name)
        if not path.is_file():
            raise FgcError(
                f"no config {str(name)!r} in project {project.dir}",
                Location(str(path)),
                hint="configs: " + ", ".join(str(p.relative_to(project.config_dir)) for p in project.configs()),
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

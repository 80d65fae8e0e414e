"""The Jinja2 environment configs render in: sandboxed, strict, with fgc's globals and filters."""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import sys

import jinja2
import jinja2.sandbox
import yaml


# Plain scalars that mean the same everywhere: no indicators, no flow characters, no edge spaces.
# "@" (reserved in YAML) may not start a plain scalar
_PLAIN_SAFE_RE = re.compile(r"[A-Za-z0-9_./+=$-](?:[A-Za-z0-9_./+=@$' -]*[A-Za-z0-9_./+=@$-])?")


class TemplateRaise(Exception):
    """``raise(msg)`` or a failed ``assert(cond, msg)`` in a template."""


class Versions(dict):
    """``versions``: python, torch and transformers versions, looked up only when used."""

    def __init__(self) -> None:
        super().__init__(python=sys.version.split()[0])

    def __missing__(self, key):
        if key not in ("torch", "transformers"):
            raise KeyError(key)
        try:
            from importlib.metadata import version

            self[key] = version(key)
        except Exception:
            self[key] = None
        return self[key]

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _NotedStr(str):
    """A string global whose use makes the build machine-specific (noted when it is printed)."""

    def __new__(cls, value: str, name: str, nonrepro: dict[str, str]):
        self = super().__new__(cls, value)
        self._name, self._nonrepro = name, nonrepro
        return self

    def __str__(self) -> str:
        self._nonrepro[self._name] = str.__str__(self)
        return str.__str__(self)


def host_globals(nonrepro: dict[str, str]) -> dict:
    """``hostname``, ``uname`` and ``versions`` for a config's render."""
    return {
        "hostname": _NotedStr(socket.gethostname(), "hostname", nonrepro),
        "uname": platform.uname()._asdict(),
        "versions": Versions(),
    }


def toyaml(value, *default):
    """Render a value as a one-line YAML scalar or flow collection."""
    if isinstance(value, jinja2.Undefined):
        if default:
            value = default[0]
        else:
            value._fail_with_undefined_error()
    return _toyaml(value)


def _loads_as_str_in_yaml_1_1(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return False


def _toyaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toyaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toyaml(k)}: {_toyaml(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if (
        _PLAIN_SAFE_RE.fullmatch(text)  # fullmatch: "$" would accept a trailing newline
        and isinstance(_resolve_plain(text), str)  # fgc reads YAML 1.2 ...
        and _loads_as_str_in_yaml_1_1(text)  # ... other tools YAML 1.1 (yes, on, 1_000)
    ):
        return text  # safe as a plain scalar in block and flow context alike
    if text.isprintable():
        return "'" + text.replace("'", "''") + "'"
    # control characters, line breaks: a double-quoted scalar with escapes, on one line
    return yaml.safe_dump(text, default_style='"', width=1 << 30).strip().removesuffix("\n...")


def _resolve_plain(text: str):
    from .loader import resolve_plain_scalar  # the loader imports this module

    return resolve_plain_scalar(text)


class TrackedNamespace(jinja2.utils.Namespace):
    """``namespace()`` that records the template line of every ``-- set ns.NAME = ...``.

    ``history[NAME]`` lists (template key, line) in the order the assignments ran, so the origin
    of a knob (the child's line, not the parent's default) can be shown in generated code and by
    ``fgc explain``.
    """

    def __init__(*args, **kwargs):  # Namespace's own signature: (self, *args, **kwargs)
        self, history, *rest = args
        super(TrackedNamespace, self).__init__(*rest, **kwargs)
        object.__setattr__(self, "_fgc_history", history)

    def __setitem__(self, name, value):
        frame = sys._getframe(1)
        while frame is not None:
            template = frame.f_globals.get("__jinja_template__")
            if template is not None:
                line = template.get_corresponding_lineno(frame.f_lineno)
                object.__getattribute__(self, "_fgc_history").setdefault(name, []).append(
                    (template.filename, line)
                )
                break
            frame = frame.f_back
        super().__setitem__(name, value)


def make_environment(
    loader: jinja2.BaseLoader, nonrepro: dict[str, str], ns_history: dict | None = None
) -> jinja2.Environment:
    """A sandboxed, strict Jinja2 environment; non-reproducible globals note their values in NONREPRO;
    namespace assignments are recorded in NS_HISTORY."""
    env = jinja2.sandbox.SandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )

    def note(name, value):
        nonrepro[name] = str(value)
        return value

    def _raise(msg):
        raise TemplateRaise(str(msg))

    def _assert(cond, msg="assertion failed"):
        if not cond:
            raise TemplateRaise(str(msg))
        return ""

    def hf_config(model_dir=None):
        from fgc.hf import read_config_json  # fgc.hf imports this module

        return read_config_json(model_dir, nonrepro)

    env.globals.update(
        joinpath=lambda *parts: os.path.join(*parts),
        normpath=os.path.normpath,
        abspath=lambda p: note(f"abspath({p})", os.path.abspath(p)),
        relpath=lambda p, start=None: (
            os.path.relpath(p, start) if start is not None else note(f"relpath({p})", os.path.relpath(p))
        ),
        dirname=os.path.dirname,
        basename=os.path.basename,
        splitext=os.path.splitext,
        getenv=lambda name, default=None: note(f"getenv({name})", os.environ.get(name, default)),
        getcwd=lambda: note("getcwd()", os.getcwd()),
        user_home_dir=lambda: note("user_home_dir()", os.path.expanduser("~")),
        repr=repr,
        now=lambda: note("now()", datetime.datetime.now()),
        utcnow=lambda: note("utcnow()", datetime.datetime.now(datetime.timezone.utc)),
        isotime=lambda: note("isotime()", datetime.datetime.now().isoformat()),
        utcisotime=lambda: note(
            "utcisotime()", datetime.datetime.now(datetime.timezone.utc).isoformat()
        ),
        filetime=lambda: note("filetime()", datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")),
        utcfiletime=lambda: note(
            "utcfiletime()",
            datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S"),
        ),
    )
    history = ns_history if ns_history is not None else {}
    env.globals["namespace"] = lambda *args, **kwargs: TrackedNamespace(history, *args, **kwargs)
    env.globals["raise"] = _raise
    env.globals["assert"] = _assert
    env.globals["hf_config"] = hf_config
    env.filters["toyaml"] = toyaml
    env.filters["fgc_rstrip_newlines"] = lambda s: str(s).rstrip("\n")
    return env



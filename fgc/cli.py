"""The ``fgc`` command line (docs/status.md, the command table).

Exit status: 0 success, 1 an internal error (a bug), 2 a user error (printed as
``FILE:LINE: error: MESSAGE``, no traceback unless ``--debug``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import traceback
from pathlib import Path

import click
import yaml

from .codegen import black_worker
from .errors import Diagnostic, FgcError, Location

# whether this process is the `fgc` console script (fgc.cli.run), not an in-process caller
_CONSOLE_SCRIPT = False
BUG_REPORT = "fgc: internal error (a bug in fgc): please report it with the command and config above"


def _print_diagnostics(diags: list[Diagnostic]) -> None:
    for d in diags:
        click.echo(d.format(), err=True)


def _parse_defines(defines: tuple[str, ...]) -> dict:
    """``-D NAME=VALUE`` pairs. VALUE is parsed as YAML (1.2 core scalars) into plain data:
    scalars, lists and mappings; text that is not YAML is taken as it is. A value is data, never
    code: a YAML tag, anchor or alias in it is an error (the render then prints every string of it
    as data, see fgc.frontend.environment.DataStr)."""
    from .frontend.environment import INTERNAL_MARKS
    from .frontend.loader import MAX_YAML_DEPTH, plain_data, too_deep

    out = {}
    for item in defines:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise FgcError(
                f"-D {item!r}: expected NAME=VALUE with NAME a Python identifier",
                Location("<command line>"),
            )

        def refuse(message: str, hint: str | None = None):
            return FgcError(f"-D {name}: {message}", Location("<command line>"), hint)

        marks = sorted(set(value) & set(INTERNAL_MARKS))
        if marks:
            raise refuse(f"the value holds U+{ord(marks[0]):04X}, a noncharacter that fgc uses internally")

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            events = list(yaml.parse(value, Loader=loader))
        except yaml.YAMLError:
            out[name] = value  # not YAML: take the text as it is
            continue
        for event in events:
            what = (
                f"the alias *{event.anchor}" if isinstance(event, yaml.AliasEvent)
                else f"the anchor &{event.anchor}" if getattr(event, "anchor", None)
                else f"the tag {event.tag}" if getattr(event, "tag", None)
                else None
            )
            if what:
                raise refuse(
                    f"values are plain data (scalars, lists, mappings); {what} is not allowed",
                    hint=f"to pass the text as a string, quote it: -D {name}='\"...\"'",
                )
        if too_deep(value) is not None:
            raise refuse(f"the value nests deeper than {MAX_YAML_DEPTH} levels (fgc's limit)")
        try:
            node = yaml.compose(value, Loader=loader)
        except yaml.YAMLError:  # e.g. two documents
            out[name] = value
            continue
        if _has_merge_key(node):
            # data has no aliases to merge: a plain '<<' key would be a key named '<<'
            raise refuse(
                "a merge key '<<' is not allowed in a value (it has no anchors to merge)",
                hint=f"write the mapping's keys out, or quote the key: -D {name}='{{\"<<\": ...}}'",
            )
        try:
            out[name] = None if node is None else plain_data(node)
        except TypeError:  # a list or a mapping as a mapping key: unhashable
            raise refuse("a mapping key must be a scalar") from None
    return out


def _has_merge_key(node) -> bool:
    """Whether a composed YAML value has a plain ``<<`` mapping key anywhere."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.value == "<<" and not k.style:
                    return True
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return False


def command(fn):
    """Run a command body; user errors exit 2, bugs exit 1 (traceback only with --debug for users)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        # A command is short and allocates many objects that are rarely cycles (parse trees,
        # templates, torch's import): the cyclic collector's passes took a third of a cold
        # build (benchmarks/build.py). It is paused for the command and resumed after it, so an
        # in-process caller (the tests) keeps collecting. `fgc data`, which reads a corpus of any
        # size, turns it back on.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        except FgcError as exc:
            if debug:
                traceback.print_exc()
            _print_diagnostics(exc.diagnostics)
            sys.exit(2)
        except BrokenPipeError:
            # the reader went away (e.g. `fgc pp CONFIG | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception:
            traceback.print_exc()
            click.echo(BUG_REPORT, err=True)
            sys.exit(1)
        finally:
            (gc.enable if collecting else gc.disable)()

    return wrapper


@contextlib.contextmanager
def _generating():
    """Where a command generates a package: in the console script, black formats in a second
    process started now, so that its import runs beside torch's (fgc/codegen/black_worker.py);
    once the package is made, fgc's cache is kept to its size (fgc/cache.py)."""
    with black_worker.running() if _CONSOLE_SCRIPT else contextlib.nullcontext():
        yield
    from . import cache

    cache.maybe_prune()


def config_arg(fn):
    """CONFIG, a config file; with ``-p DIR`` a config name in that project (default: its default_config)."""
    fn = click.option(
        "-p",
        "--project",
        "project",
        type=click.Path(path_type=Path, file_okay=False),
        help="CONFIG is a config name in the project DIR",
    )(fn)
    return click.argument("config", required=False, type=click.Path(path_type=Path))(fn)

include_opt = click.option(
    "-I", "include_dirs", multiple=True, metavar="DIR", help="add DIR to the template search path"
)
def _complete_define(ctx, param, incomplete):
    from .complete import complete_define

    return complete_define(ctx, param, incomplete)


define_opt = click.option(
    "-D",
    "defines",
    multiple=True,
    metavar="NAME=VALUE",
    help="set a config variable (YAML value)",
    shell_complete=_complete_define,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks for user errors too")
@click.version_option(package_name="fgc")
def main(debug: bool) -> None:
    """fgc: compile templated YAML experiment configs into standalone PyTorch training packages."""


@main.command()
@config_arg
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="output directory")
@include_opt
@define_opt
@click.option(
    "--force",
    is_flag=True,
    help="build into a non-empty directory that is not an fgc build (keeping its files), "
    "or over generated files edited since",
)
@click.option("--no-smoke", is_flag=True, help="skip the build-time check that the model constructs")
@click.option("--dump-after", metavar="PASS", help="print the IR after this lowering pass")
@command
def build(config, project, out, include_dirs, defines, force, no_smoke, dump_after):
    """Compile CONFIG into a standalone training package in OUT."""
    from .build import build_package, check_output_dir, compile_config

    if dump_after is not None:
        # the pass list imports torch: a build without --dump-after imports it only to lower
        from fgc_lowering.pipeline import PASS_NAMES

        if dump_after not in PASS_NAMES:
            raise FgcError(
                f"--dump-after: unknown pass {dump_after!r}",
                Location("<command line>"),
                hint="passes: " + ", ".join(PASS_NAMES),
            )
    check_output_dir(out, force)
    with _generating():
        compiled = compile_config(
            config, include_dirs, _parse_defines(defines), dump_after=dump_after, project_dir=project
        )
        _print_diagnostics(compiled.warnings)
        build_package(compiled, out, force=force, smoke=not no_smoke)
    plan = compiled.ctx.plan
    launcher = (
        f"torchrun --nproc-per-node {plan.nproc} {out}/train.py"
        if plan.launcher == "torchrun"
        else f"python {out}/train.py"
    )
    # a mesh of more than one dimension is named too: "pipeline trainer" alone hides FSDP2 x PP
    dims = plan.mesh_text(without_ones=True)
    mesh = f", mesh {dims}" if " x " in dims else ""
    click.echo(f"fgc: built {out} ({plan.trainer_type} trainer{mesh}); run: {launcher}", err=True)


@main.command()
@config_arg
@include_opt
@define_opt
@command
def check(config, project, include_dirs, defines):
    """Check CONFIG as `build` would, writing nothing."""
    from .build import check_config
    from .errors import display_path

    with _generating():
        compiled = check_config(config, include_dirs, _parse_defines(defines), project_dir=project)
    _print_diagnostics(compiled.warnings)
    click.echo(f"{display_path(str(compiled.rendered.source.path))}: OK", err=True)


@main.command()
@config_arg
@include_opt
@define_opt
@command
def pp(config, project, include_dirs, defines):
    """Print CONFIG's rendered YAML."""
    from .frontend.render import render

    rendered = render(config, include_dirs, _parse_defines(defines), project)
    _print_diagnostics(rendered.warnings)
    text = rendered.text.lstrip("\n")  # blank lines left by statement-only blocks
    click.echo(text, nl=not text.endswith("\n"))


@main.command()
@config_arg
@include_opt
@define_opt
@command
def targets(config, project, include_dirs, defines):
    """List CONFIG's targets, with where each is defined."""
    from .frontend.loader import load
    from .frontend.render import render

    ir = load(render(config, include_dirs, _parse_defines(defines), project))
    for name, node_id in ir.targets.items():
        node = ir.node(node_id)
        what = f"!{node.mode}:{node.spec}" if node.kind == "call" else node.kind
        click.echo(f"{name}\t{what}\t{node.loc}")


@main.command()
@config_arg
@click.option("--target", "target_names", multiple=True, metavar="T", help="only what target T reaches")
@click.option(
    "--format", "fmt", type=click.Choice(["yaml", "json", "dot", "python"]), default="yaml", show_default=True
)
@include_opt
@define_opt
@command
def graph(config, project, target_names, fmt, include_dirs, defines):
    """Print CONFIG's IR graph."""
    from .inspect import construction_module, graph_text, load_for_code

    rendered, ir, ctx = load_for_code(config, include_dirs, _parse_defines(defines), project)
    targets = list(target_names) or list(ir.targets)
    _check_targets(ir, targets, ctx.config)
    if fmt == "python":
        click.echo(construction_module(ir, ctx, targets, rendered.source.path.name), nl=False)
    else:
        click.echo(graph_text(ir.restrict(targets), fmt), nl=False)


@main.command()
@config_arg
@click.option("--target", "target_name", required=True, metavar="T", help="the target to construct")
@include_opt
@define_opt
@command
def code(config, project, target_name, include_dirs, defines):
    """Print a Python module whose construct(**vars) builds target T as CONFIG says."""
    from .inspect import construction_module, load_for_code

    rendered, ir, ctx = load_for_code(config, include_dirs, _parse_defines(defines), project)
    _check_targets(ir, [target_name], ctx.config)
    click.echo(construction_module(ir, ctx, [target_name], rendered.source.path.name), nl=False)


def _check_targets(ir, targets, config) -> None:
    unknown = [t for t in targets if t not in ir.targets]
    if unknown:
        raise FgcError(
            "no target " + ", ".join(repr(t) for t in unknown),
            Location(str(config)),
            hint="targets: " + ", ".join(ir.targets),
        )


@main.command()
@config_arg
@click.option("--format", "fmt", type=click.Choice(["text", "dot"]), default="text", show_default=True)
@include_opt
@define_opt
@command
def tree(config, project, fmt, include_dirs, defines):
    """Print the extends/include tree of CONFIG's templates."""
    from .inspect import template_tree

    from .frontend.render import render

    rendered = render(config, include_dirs, _parse_defines(defines), project)
    click.echo(template_tree(rendered, fmt), nl=False)


@main.command()
@click.argument("a", type=click.Path(path_type=Path, exists=False))
@click.argument("b", type=click.Path(path_type=Path, exists=False))
@click.option(
    "-p", "--project", "project", type=click.Path(path_type=Path, file_okay=False),
    help="A and B are config names in the project DIR (or build directories)",
)
@include_opt
@define_opt
@command
def diff(a, b, project, include_dirs, defines):
    """Show what differs between two experiments: configs or build directories.

    -D and -I apply to both sides. manifest.json is left out (it only hashes the other files).
    Exit status 0 when they are the same, 1 when they differ."""
    from .diff import diff_text

    for p in (a, b):
        if not p.exists() and project is None:
            raise FgcError("no such config file or build directory", Location(str(p)))
    with _generating():
        text = diff_text(a, b, include_dirs, _parse_defines(defines), project)
    click.echo(text, nl=False)
    sys.exit(1 if text else 0)


@main.command()
@config_arg
@click.argument("key_path", required=False, metavar="[KEY.PATH]")
@include_opt
@define_opt
@command
def explain(config, project, key_path, include_dirs, defines):
    """Explain CONFIG: parameters, FLOPs, plan and memory; or where KEY.PATH's value came from."""
    from .build import compile_config
    from .explain import explain_key, explain_summary

    compiled = compile_config(config, include_dirs, _parse_defines(defines), project_dir=project)
    _print_diagnostics(compiled.warnings)
    click.echo(explain_key(compiled, key_path) if key_path else explain_summary(compiled), nl=False)


@main.command(name="ls")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "-p", "--project", "project", type=click.Path(path_type=Path, file_okay=False),
    help="list the configs of the project DIR (found through its meta.yaml's searchdir and config_prefix)",
)
@include_opt
@command
def ls_(directory, project, include_dirs):
    """List every config under DIRECTORY (default: the current project) with OK or its first error."""
    from .inspect import list_configs

    if project is not None and directory is not None:
        raise FgcError("give a DIRECTORY or -p PROJECT, not both", Location("<command line>"))
    failures = 0
    for shown, said, ok in list_configs(directory, include_dirs, project=project):
        click.echo(f"{shown}: {'OK' if said is None else said}")
        failures += not ok
    sys.exit(2 if failures else 0)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="output directory")
@click.option(
    "--tokenizer",
    default="byte",
    show_default=True,
    help="byte (built in), a tokenizer.json file or a local Hugging Face tokenizer directory",
)
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    help="text (text files, or the text field of records) or chat (messages/conversations records)",
)
@click.option(
    "--chat-template",
    default=None,
    help="chatml (bundled) or a Jinja file: install this template (and its tokens) on the tokenizer",
)
@click.option("--val-fraction", default=0.0, type=float, show_default=True, help="share of documents held out")
@command
def data(inputs, out, tokenizer, fmt, chat_template, val_fraction):
    """Tokenize local text files, JSONL/JSON/Parquet files or save_to_disk datasets into token shards in OUT."""
    from .data import tokenize_to_shards

    gc.enable()  # a corpus of any size, read for as long as it takes: cycles are collected (see command())
    info = tokenize_to_shards(
        list(inputs), out, tokenizer=tokenizer, val_fraction=val_fraction, format=fmt, chat_template=chat_template
    )
    targets = f", {info['target_tokens']} target tokens" if "target_tokens" in info else ""
    click.echo(
        f"fgc: wrote {out}: {info['train_tokens']} train and {info['val_tokens']} val tokens{targets} "
        f"({info['tokenizer']} tokenizer, vocab {info['vocab_size']})",
        err=True,
    )


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="the figure: FILE.png")
@click.option(
    "--metric",
    default="loss",
    show_default=True,
    help="a field of the training records: loss (with eval_loss), tokens_per_s, lr, grad_norm, peak_mem_bytes, ...",
)
@click.option("--label", "labels", multiple=True, help="a run's label, once per run in order (default: its directory)")
@command
def plot(runs, out, metric, labels):
    """Draw the curves of several runs (their output directories) on one figure."""
    from .plot import plot_runs

    plot_runs(list(runs), out, metric=metric, labels=list(labels) or None)
    click.echo(f"fgc: wrote {out}", err=True)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@command
def new(path):
    """Make a new project in PATH: meta.yaml, a config over fgc's library, a little data."""
    from .new import new_project

    new_project(path)
    click.echo(f"fgc: made {path}; next: cd {path} && fgc build configs/train.yaml -o build/ && python build/train.py", err=True)


def run() -> None:
    """The ``fgc`` console script (and ``python -m fgc``): :func:`main`, then a quick exit.

    A build imports torch, libcst and black; the interpreter's teardown of those modules takes
    about a third of a second and does nothing a finished command needs: fgc closes every file
    it writes and removes its temporary directories itself. So once the command is over and
    its output flushed, the process ends at once with the command's status (``os._exit``).
    """
    global _CONSOLE_SCRIPT
    _CONSOLE_SCRIPT = True
    try:
        main(prog_name="fgc")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): Python prints it and exits 1
            print(exc.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            pass
    os._exit(code)


if __name__ == "__main__":
    run()

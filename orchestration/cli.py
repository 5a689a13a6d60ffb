"""The command line shared by the entry scripts (pretrain.py, distill.py, tune.py):

    SCRIPT [--config PRESET] [--dump-config] [section.key=value ...]

The config is loaded (``configs/PRESET.yaml`` plus dotted overrides), resolved and checked before any Ray
resource is taken; then ``orchestration.driver.run`` runs the job and the closing lines say where everything
is. Exit codes: 0 done, 1 the job failed, 2 bad input (the message names the key, file or URL).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from infra.config import ConfigError, dump_config, load_config, redact_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None, *, doc: str, script: str, preset: str, recipe: str | None = None,
         flags: dict[str, tuple[str, str]] | None = None, runner=None) -> int:
    """Run the entry script ``script`` (its path) whose module docstring is ``doc``, with the default config
    ``preset``; ``recipe`` (if given) is the recipe its configs must name. ``flags`` adds options that set a
    config key: ``{"--teacher": ("distill.teacher", help)}``. ``runner`` is ``orchestration.driver`` (a job,
    the default) or ``orchestration.sweep``: its ``prepare``, ``run`` and ``summary``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=preset, help="preset name (configs/NAME.yaml) or YAML path")
    parser.add_argument("--dump-config", action="store_true", help="print the resolved config and exit")
    for flag, (key, text) in (flags or {}).items():
        parser.add_argument(flag, dest=key, default=None, help=f"{text} (sets {key})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 run.name=my-run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    flag_overrides = [f"{key}={getattr(args, key)}" for key, _ in (flags or {}).values()
                      if getattr(args, key) is not None]

    from orchestration import driver

    runner = runner or driver
    try:
        cfg = load_config(args.config, [*args.overrides, *flag_overrides])
        if args.dump_config:
            print(dump_config(cfg))
            return 0
        if recipe and cfg.recipe != recipe:
            raise ConfigError(f"{args.config} is a recipe={cfg.recipe} job; this script runs recipe={recipe} jobs")
        cfg = runner.prepare(cfg)
    except driver.INPUT_ERRORS as e:
        print(f"error: {redact_url(str(e))}", file=sys.stderr)
        return 2
    source = os.path.relpath(script, REPO) if script.startswith(REPO) else script
    try:
        result = runner.run(cfg, source)
    except KeyboardInterrupt:
        result = None
    if result is None or result.interrupted:
        print(f"\ninterrupted: {cfg.run.name} is recorded as KILLED; resume it from where it stopped with\n"
              f"  python {source} --config {args.config} run.name={cfg.run.name} "
              f"{' '.join(shlex.quote(o) for o in args.overrides if not o.startswith('run.name='))}",
              file=sys.stderr)
        return 130
    if result.error is not None:
        print(f"error: {cfg.run.name} failed: {redact_url(str(result.error))}", file=sys.stderr)
        return 1
    print("\n" + runner.summary(result))
    return 0

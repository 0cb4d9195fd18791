"""`vserve serve`: arguments → one ServeConfig → the supervisor."""

from __future__ import annotations

import argparse
from pathlib import Path

from vserve import envs
from vserve.cli.args import add_config_args, config_from_args
from vserve.config import ServeConfig


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ServeConfig)


def build_config(args: argparse.Namespace) -> ServeConfig:
    keys = tuple(args.api_keys or ())
    if envs.api_key() is not None:
        keys += (envs.api_key() or "",)
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text().splitlines()
        file_keys = tuple(line.strip() for line in lines if line.strip())
        if not file_keys:
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
        keys += file_keys
    return config_from_args(args, ServeConfig, extra={"api_keys": keys})


def run_serve(args: argparse.Namespace) -> int:
    from vserve.frontend.generation_defaults import describe, load_sampling_defaults
    from vserve.frontend.tokenizer import Tokenizer
    from vserve.launch.supervisor import Supervisor
    from vserve.logging_utils import get_logger
    from vserve.models.arch import load_arch_config
    from vserve.models.source import resolve_model_dir

    logger = get_logger("vserve.cli")
    try:
        config = build_config(args)
        model = config.engine.model
        model_dir = resolve_model_dir(model.model, model.revision)
        # Fail fast, in the supervisor, on what can be checked without loading weights.
        load_arch_config(model_dir)
        if not config.parallel.headless:
            tok_dir = model.tokenizer or model_dir
            try:
                Tokenizer.from_pretrained(tok_dir, chat_template=model.chat_template)
            except Exception as e:  # noqa: BLE001 - transformers raises many kinds
                raise ValueError(f"cannot load the tokenizer from {tok_dir}: {e}") from e
            defaults = load_sampling_defaults(model_dir, model.generation_config)
            logger.info("sampling defaults for unset request fields (--generation-config "
                        "%s): %s", model.generation_config, describe(defaults))
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 2
    return Supervisor(config, model_dir).run()

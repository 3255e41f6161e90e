"""A model's transformers config, from the registry's shipped architecture file or the hub."""

from __future__ import annotations

import json
from pathlib import Path

from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec


def load_config(spec: ModelSpec):
    """The model's transformers config, offline for registry models."""
    from transformers import AutoConfig  # transformers: the gate imports this module

    try:
        if spec.architecture_file:
            config_dict = json.loads(Path(spec.architecture_file).read_text())
            return _config_from_dict(config_dict, spec.architecture_file)
        if spec.hf_id:
            return AutoConfig.from_pretrained(spec.hf_id)
    except UsageError:
        raise
    except Exception as exc:  # transformers raises many kinds: OSError, ValueError, KeyError
        where = spec.architecture_file or spec.hf_id
        raise UsageError(f"cannot read the config of {spec.name!r} from {where}: {exc}") from exc
    raise UsageError(f"{spec.name!r} has neither a shipped architecture config nor a hub id")


def _config_from_dict(config_dict: dict, where: str):
    from transformers import CONFIG_MAPPING, __version__  # transformers: the gate imports this module

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"{where}: model_type {model_type!r} is not known to transformers {__version__}; "
            "upgrade transformers or check the config"
        )
    return CONFIG_MAPPING[model_type].from_dict(config_dict)

"""What the benchmark measures and how: `Options`, written once.

Each field carries its default and its help text; `define_flags` turns the fields into absl
flags of the same names (`--only`, `--batch`, ...) and `from_flags` parses them back. No
JAX import.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TASKS = ("train", "sample", "bpd", "inception")
EXTRA_TASKS = ("forward", "input", "checkpoint")  # run only when asked for with --only


def _option(default: Any, help: str, **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class Options:
    """What to measure and how; 0 means "the default the help text describes"."""

    only: tuple[str, ...] = _option(TASKS, f"Tasks to run, from {','.join(TASKS + EXTRA_TASKS)}.")
    dtypes: tuple[str, ...] = _option(
        ("float32", "bfloat16"),
        "Compute dtypes (config.model.dtype) to measure; empty: config.model.dtype.",
    )
    batch: int = _option(0, "Train global batch; 0 = config.training.batch_size.")
    max_batch: int = _option(
        0, "Cap of the largest-batch search; 0 = 65536 on accelerators, off on CPU."
    )
    warmup: int = _option(1, "Untimed calls before timing.")
    repeats: int = _option(5, "Timed repeats (train, inception); median kept.")
    iters: int = _option(0, "Train steps per repeat; 0 = about 1 s worth.")
    sample_images: int = _option(256, "Images per sampling call.")
    sample_steps: int = _option(0, "Sampling steps; 0 = full chain.")
    sample_repeats: int = _option(3, "Timed repeats of sample and bpd.")
    bpd_batch: int = _option(0, "Bits/dim batch; 0 = the 'bpd' evaluator's batch_size.")
    bpd_timesteps: int = _option(0, "Bits/dim chain length; 0 = full.")
    inception_batch: int = _option(0, "Inception batch; 0 = the 'fid' evaluator's batch_size.")
    inception_size: int = _option(299, "Inception input side.")
    forward_flops: bool = _option(True, "Measure the forward GFLOP/image vs the published one.")
    num_devices: int = _option(0, "Use the first N devices (single process); 0 = all.")
    init: str = _option(
        "model",
        "Parameter init: the model's initialiser, or the same laws drawn on the host "
        "(host_init.host_state).",
        choices=("model", "host"),
    )
    checkpoint_dir: str = _option(
        "", "Checkpoint task folder (local; a temporary folder inside); default the system's."
    )
    profile: str = _option("", "Trace one train step per train row into this dir.")


def define_flags(flag_values: Any = None) -> None:
    """Defines one absl flag per `Options` field, with its default and help text, in
    `flag_values` (default `flags.FLAGS`)."""
    from absl import flags

    where = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
    for field in dataclasses.fields(Options):
        name, default, help = field.name, field.default, field.metadata["help"]
        if "choices" in field.metadata:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help, **where)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, list(default), help, **where)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help, **where)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help, **where)
        else:
            flags.DEFINE_string(name, default, help, **where)


def from_flags(values: Any) -> Options:
    """The `Options` of parsed absl flag values (`flags.FLAGS`) defined by `define_flags`."""
    parsed = {}
    for field in dataclasses.fields(Options):
        value = getattr(values, field.name)
        parsed[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    return Options(**parsed)

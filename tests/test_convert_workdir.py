"""`python -m diffusion_jax.tools.convert --source SRC --workdir W --config FILE`: released weights
as a workdir that the evaluation job and sample mode use like a trained run's.

The source is the synthetic google/ddpm-cifar10-32-style diffusers folder of test_convert.py
(tiny: 2 levels, 8/16 channels, attention at 16x16).
"""

import os

import jax
import numpy as np
import pytest
from test_convert import DIFFUSERS_CONFIG, diffusers_shapes, random_state_dict, write_diffusers

from diffusion_jax.runtime import distributed
from diffusion_jax.tools.convert import cli, from_diffusers, imported, mapping
from diffusion_jax.training import checkpoint
from diffusion_jax.training import state as state_lib

CIFAR10_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10.py")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    source = tmp_path_factory.mktemp("diffusers")
    write_diffusers(source, DIFFUSERS_CONFIG, random_state_dict(diffusers_shapes(DIFFUSERS_CONFIG)))
    workdir = tmp_path_factory.mktemp("converted")
    cli.main(["--source", str(source), "--workdir", str(workdir), "--config", CIFAR10_CONFIG])
    model_config, params = from_diffusers.convert_diffusers(source)
    config = mapping.merge_imported_config(imported.load_config_file(CIFAR10_CONFIG), model_config)
    return source, workdir, config, params


def test_workdir_holds_config_and_a_full_train_state_of_the_imported_weights(converted):
    _, workdir, config, params = converted
    saved = checkpoint.read_config(workdir)
    assert saved.model.ch == 8 and list(saved.model.ch_mult) == [1, 2]
    assert saved.model.num_groups == 4 and saved.training.learning_rate == 2e-4  # cifar10's
    checkpoint.check_compatible(workdir, config)
    assert checkpoint.checkpoint_steps(workdir) == [0]

    _, _, abstract = state_lib.abstract_train_state(config, distributed.make_mesh())
    state = checkpoint.restore_step(workdir, 0, abstract)
    want = mapping.flatten_params(params)
    for tree in (state.params, state.ema_params):
        got = mapping.flatten_params(jax.device_get(tree.to_pure_dict()))
        assert got.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert int(state.step) == 0 and int(state.nonfinite_step) == -1
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))


def test_existing_checkpoints_are_not_overwritten_and_cli_needs_a_config(converted, capsys):
    source, workdir, _, _ = converted
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--source", str(source), "--workdir", str(workdir), "--config", CIFAR10_CONFIG])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "already holds checkpoints" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    with pytest.raises(SystemExit):
        cli.main(["--source", str(source), "--workdir", str(workdir)])
    assert "--workdir needs --config" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_source_that_is_no_checkpoint_ends_in_one_line(tmp_path, capsys, kind):
    source = tmp_path / "nope"
    if kind == "empty":
        source.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--source", str(source), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1
    assert ("does not exist" if kind == "missing" else "holds neither format") in err
    assert "diffusers" in err and "TensorFlow" in err
    assert not (tmp_path / "out").exists()

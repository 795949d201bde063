"""Import released DDPM weights (Ho et al. 2020) into the `diffusion_jax` U-Net.

Two sources:

* diffusers folders (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256,
  ddpm-bedroom-256, ddpm-cat-256): `config.json` + `diffusion_pytorch_model.safetensors`
  (read with `safetensors.numpy`) or `diffusion_pytorch_model.bin` (read with the restricted
  unpickler `diffusion_jax.runtime.torch_pickle`; no pickle code is executed, torch is not needed).
  Both the current attention names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the legacy ones
  of the original upload (`query`, `key`, `value`, `proj_attn`) are accepted.
* TensorFlow checkpoints of the official code (variables `model/down_0/block_0/conv1/W`,
  `model/temb/dense0/W`, ...; group norms as `gamma`/`beta`), read with
  `tf.train.load_checkpoint`. The EMA weights (`<var>/ExponentialMovingAverage`) are used
  when present and `use_ema` is set, as the paper's samples are drawn from the EMA model;
  optimizer slots (`/Adam`, `/Adam_1`) and variables outside the model scope are ignored.

Layouts: torch convolutions are OIHW -> our HWIO; torch Linear weights are [out, in] ->
our [in, out] (a 1x1 conv shortcut [out, in, 1, 1] is our Dense [in, out]); TensorFlow
kernels are already HWIO / [in, out].

Every conversion is strict: every source tensor must be consumed and every model parameter
filled with the right shape, otherwise a ValueError lists the missing keys, extra keys and
mismatched shapes (name and both shapes).

The imported model config is a ConfigDict with the sections the weights determine:
`model` (name, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
num_groups, norm_eps, num_classes), `data` (image_size, channels) and, only for a model
with a learned variance (twice the input channels out), `diffusion.model_var_type`.
`merge_imported_config(config, imported)` writes them into a full experiment config.

On-disk format of `save_imported(out_dir, ...)` (read by `load_imported`):

* `out_dir/model_config.json`: the imported config as JSON (`ConfigDict.to_dict()`);
* `out_dir/params.safetensors`: float32 parameters in our layout, one tensor per
  parameter, named by its path in `nnx.state(model, nnx.Param).to_pure_dict()` joined with
  "/" (e.g. `down/0/blocks/1/conv1/kernel`), with metadata `format=diffusion_jax.imported`.

`params` everywhere is the nested pure dict of numpy arrays of that state (list indices as
int keys), usable with `load_params_into(model, params)` or `nnx.replace_by_pure_dict`.

Workdir output (`--workdir W --config configs/cifar10.py`, `write_workdir`): `W/config.json`
holds the experiment config merged with the imported model config (`merge_imported_config`),
and `W/checkpoints/0` an orbax checkpoint of a full `state.TrainState` whose `params` and
`ema_params` are the imported weights (optimiser state freshly initialised, step 0), so that
`python -m diffusion_jax.main --config configs/cifar10.py --workdir W --mode eval
--config.eval.once=True` (or `--mode sample`) evaluates the released model as it would a
trained one.
"""

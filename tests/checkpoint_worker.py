"""One process of the two-process checkpoint test (`test_checkpoint.py`): saves checkpoints
1 and 2 of a small replicated state together with the other process, then restores the
newest one once per scenario, the fault injected at orbax's reader (its checkpoint handler's
restore) on process 1 only, and prints one JSON line per scenario: what `restore_newest`
returned or raised here.

    python tests/checkpoint_worker.py PROCESS_ID PORT DIRECTORY SCENARIO[,SCENARIO...]
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, directory, scenarios = sys.argv[1:5]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from diffusion_jax.training import checkpoint  # noqa: E402

checkpoint.READ_RETRY_DELAYS_S = (0.05, 0.05, 0.05, 0.05)
FAULTS = {  # scenario: (error, failing calls: None for every call)
    "blip": (ValueError("UNAVAILABLE: Connection reset by peer; retry later"), 1),
    "lasting": (ValueError("UNAVAILABLE: Connection reset by peer; retry later"), None),
    "bug": (TypeError("restore() got an unexpected keyword argument"), None),
    "none": (None, 0),
}

repl = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())


def state(step: int) -> dict:
    w = np.arange(256 * 256, dtype=np.float32).reshape(256, 256) * step
    return {"w": jax.device_put(w, repl), "step": jax.device_put(np.int32(step), repl)}


mngr = checkpoint.manager(directory)
if not mngr.all_steps():
    for step in (1, 2):
        checkpoint.save(mngr, step, state(step))
    checkpoint.finish_saving(mngr, 2)
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state(0))
real_restore = ocp.StandardCheckpointHandler.restore
for scenario in scenarios.split(","):
    error, times = FAULTS[scenario]
    calls = []

    def restore(*args, error=error, times=times, calls=calls, **kwargs):
        calls.append(1)
        if jax.process_index() == 1 and (times is None or len(calls) <= times):
            raise error
        return real_restore(*args, **kwargs)

    ocp.StandardCheckpointHandler.restore = restore
    try:
        step, restored = checkpoint.restore_newest(mngr, abstract, move_damaged=True)
        w = np.asarray(restored["w"].addressable_shards[0].data)
        result = {"step": step, "equal": bool(np.array_equal(w, np.asarray(state(step)["w"])))}
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps({"scenario": scenario, "process": jax.process_index(), **result}), flush=True)
mngr.close()

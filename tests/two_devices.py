"""Two simulated CPU devices, for the multi-device check scripts.

Import this module before anything imports JAX (the device count is read when
JAX initialises): ``multidevice_check.py`` and ``axis_name_check.py`` do, as
scripts run by ``test_multidevice.py`` in a subprocess. Gives the mesh axis
``AXIS``, the 2-device ``MESH`` and ``emit`` (one JSON line per result).
"""

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

AXIS = "batch"
MESH = jax.sharding.Mesh(np.array(jax.devices()[:2]), (AXIS,))


def emit(record: dict):
  """Prints ``record`` as one JSON line, flushed (the test reads it live)."""
  print(json.dumps(record), flush=True)

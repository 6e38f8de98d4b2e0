"""float16 plain uploads through a whole simulated run: the same seeded round with float32
and with float16 uploads gives global adapters within float16's rounding of each other, and
the float16 run's global adapter is stored as float32."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sqlalchemy import select

from conftest import tiny_run_toml
from fedtune.common.database import transaction
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_run_config
from fedtune.platform.db.storage import AdapterCheckpoint, Round, open_database
from fedtune.platform.wire.plain_upload import FLOAT16_ABSOLUTE_ERROR, FLOAT16_RELATIVE_ERROR
from fedtune.simulation import simulate

pytestmark = pytest.mark.simulation


def global_adapter(workdir: Path, tiny_model_dir: Path, upload: str) -> dict[str, np.ndarray]:
    """Round 1's global adapter of a seeded two-node run with ``upload`` on the wire."""
    workdir = workdir / upload
    for domain in ("hospital", "bank"):
        write_demo_data(workdir / "data", domain=domain, train=32, held_out=4)
    (workdir / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": f"upload-{upload}", "rounds": 1},
            nodes=[{"name": "hospital"}, {"name": "bank"}],
        )
        + f'\n[aggregation]\nplain_upload = "{upload}"\n'
    )
    config = load_run_config(workdir / "run.toml")
    assert config.aggregation.plain_upload == upload
    run_id = simulate(config, progress=lambda line: None)
    with transaction(open_database(config.database_url)) as session:
        [round_] = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        [checkpoint] = session.scalars(
            select(AdapterCheckpoint).where(AdapterCheckpoint.run_id == run_id)
        ).all()
        path = Path(checkpoint.path)
    assert round_.updates_accepted == 2 and round_.updates_rejected == 0
    [weights] = path.glob("*.safetensors")
    return load_file(weights)


def test_a_float16_run_s_global_adapter_is_the_float32_one_within_float16_rounding(
    tmp_path, tiny_model_dir
):
    exact = global_adapter(tmp_path, tiny_model_dir, "float32")
    halved = global_adapter(tmp_path, tiny_model_dir, "float16")

    assert exact.keys() == halved.keys()
    assert {a.dtype for a in halved.values()} == {np.dtype(np.float32)}
    errors = []
    for name, value in exact.items():
        # Each node's value is rounded once (2**-11 of itself at most), then averaged: the
        # mean moves by at most 2**-11 of the larger node value; the nodes' values are bounded
        # here by twice the largest global one (they trained the same steps from one start).
        error = float(np.abs(halved[name] - value).max())
        largest = float(np.abs(value).max())
        assert error <= 2 * largest * FLOAT16_RELATIVE_ERROR + FLOAT16_ABSOLUTE_ERROR, name
        errors.append(error)
    assert max(errors) > 0  # float16 did round: the runs are not equal by accident

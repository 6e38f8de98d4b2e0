"""A run's protections are recorded when it starts, from what the coordinator runs and the
run's own configuration: a deployed run from its SuperLink's command and TLS files (carried in
the submitted job), a simulated one as what it is (no network, averages in the clear)."""

from __future__ import annotations

import hashlib

from fedtune.coordinator.job import DeploymentJob
from fedtune.coordinator.run_protections import run_protections
from fedtune.coordinator.superlink import deployment_job
from fedtune.platform.config import CoordinatorConfig, RunConfig


def coordinator_config(tmp_path) -> CoordinatorConfig:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n")
    return CoordinatorConfig.model_validate(
        {
            "coordinator": {"state_dir": str(tmp_path / "state")},
            "tls": {
                "ca_certificate": str(tmp_path / "ca.pem"),
                "certificate": str(tmp_path / "cert.pem"),
                "private_key": str(tmp_path / "key.pem"),
            },
        }
    )


def run_config(**aggregation) -> RunConfig:
    return RunConfig.model_validate(
        {
            "nodes": [{"name": "hospital"}, {"name": "bank", "release_metrics": "dp"}],
            "output": {"dir": "out"},
            "aggregation": aggregation,
        }
    )


def test_a_submitted_job_carries_what_the_coordinator_enforces(tmp_path):
    coordinator = coordinator_config(tmp_path)

    job = deployment_job(coordinator, run_config(), run_id="r1")

    facts = DeploymentJob.model_validate_json(job.model_dump_json()).coordinator
    assert facts is not None
    assert facts["tls"] and facts["node_authentication"] and facts["pinned_apps"]
    assert facts["superlink_host"] == "127.0.0.1"
    ca = hashlib.sha256((tmp_path / "ca.pem").read_bytes()).hexdigest()
    assert facts["ca_certificate_sha256"] == ca


def test_a_deployed_runs_protections_come_from_the_job_and_its_configuration(tmp_path):
    job = deployment_job(
        coordinator_config(tmp_path),
        run_config(secure=True, node_dp={"clipping_norm": 0.5, "noise_multiplier": 1.1}),
        run_id="r1",
    )

    protections = run_protections(job.run, deployment=job.coordinator)

    assert protections["mode"] == "deployment"
    assert {name: protections[name]["state"] for name in ("tls", "node_authentication")} == {
        "tls": "on",
        "node_authentication": "on",
    }
    assert protections["secure_aggregation"]["state"] == "on"
    assert "noise multiplier 1.1" in protections["node_level_dp"]["detail"]
    assert protections["example_level_dp"]["state"] == "per node"


def test_a_job_from_before_facts_were_recorded_says_not_recorded_rather_than_off():
    protections = run_protections(run_config(secure=False), deployment={})

    assert protections["tls"]["state"] == "not recorded"
    assert protections["secure_aggregation"]["state"] == "off"


def test_a_simulated_run_has_no_transport_and_averages_in_the_clear():
    protections = run_protections(run_config(), deployment=None)

    assert protections["mode"] == "simulation"
    assert protections["tls"]["state"] == "not applicable"
    assert protections["secure_aggregation"]["state"] == "off"
    assert protections["metric_release"]["detail"] == "hospital: plain, bank: dp"
    assert "target epsilon 8" in protections["example_level_dp"]["detail"]

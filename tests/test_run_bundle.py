"""Which run bundles (Flower app bundles, FABs) fedtune's coordinator and nodes accept: their
own, built by Flower from `fedtune run start`'s app folder, and nothing else."""

from __future__ import annotations

import pytest
from flwr.cli.build import build_fab_from_disk

from fedtune.coordinator.superlink import SUBMISSION_FILE, write_app
from fedtune.platform.wire.run_bundle import UntrustedBundleError, check_bundle


def test_the_bundle_fedtune_submits_is_accepted_also_when_submitted_again(
    app_folder, submitted_job
):
    (app_folder / SUBMISSION_FILE).write_text("{}")  # left by an earlier submission
    write_app(app_folder, submitted_job)

    check_bundle(build_fab_from_disk(app_folder))


def test_a_bundle_carrying_code_is_refused(app_folder):
    (app_folder / "helper.py").write_text("import os\n")

    with pytest.raises(UntrustedBundleError, match=r"carries code or other files \(helper\.py\)"):
        check_bundle(build_fab_from_disk(app_folder))


def test_a_bundle_naming_another_clientapp_is_refused(app_folder):
    pyproject = app_folder / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace("fedtune.client_node.deployed_app:app", "evil:app")
    )

    with pytest.raises(UntrustedBundleError, match=r"run 7 names ClientApp 'evil:app'$"):
        check_bundle(build_fab_from_disk(app_folder), run_id=7)


def test_a_bundle_naming_another_serverapp_is_refused(app_folder):
    pyproject = app_folder / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace("fedtune.coordinator.deployed_app:app", "evil:server")
    )

    with pytest.raises(UntrustedBundleError, match=r"names ServerApp 'evil:server'$"):
        check_bundle(build_fab_from_disk(app_folder))


def test_bytes_that_are_no_bundle_are_refused():
    with pytest.raises(UntrustedBundleError, match="sends a bundle that cannot be read"):
        check_bundle(b"not a zip file")


def test_a_bundle_that_does_not_match_its_hash_is_refused(app_folder):
    with pytest.raises(UntrustedBundleError, match="does not match its hash"):
        check_bundle(build_fab_from_disk(app_folder), fab_hash="0" * 64)

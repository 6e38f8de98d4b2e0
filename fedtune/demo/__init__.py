"""The demos: demo data, the simulated demo (`fedtune demo`) and the local multi-process
deployment (`fedtune demo --deployment`, also the deployment tests' harness). Nothing a hospital
installs depends on it."""

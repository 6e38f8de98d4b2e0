"""The auditor's tools: verify an exported ledger file offline, recompute every epsilon
with an independent accountant, and report on it. They depend on the privacy core alone (no
Flower, no coordinator database), so an auditor can read them by themselves."""

"""The privacy core: what a node may spend and what it spent.

Accounting of DP-SGD rounds and the budget guard, the signed hash-chained epsilon ledger
(entries, storage, the node's ledger, the file format, the Ed25519 signing key), node-level DP
accounting and the export of a ledger for the auditor. It imports no role package and nothing
of ``fedtune.platform``; ``platform`` builds on it. The auditor's tools are in
:mod:`fedtune.privacy.audit`.
"""

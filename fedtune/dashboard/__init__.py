"""The coordinator's dashboard: a Streamlit app that reads the coordinator's database and
never writes it (runs, privacy budgets, A/B tests, model health, ledger audits).

Start it with ``fedtune dashboard --db URL`` (:func:`fedtune.dashboard.launch.run_dashboard`).
"""

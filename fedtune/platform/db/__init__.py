"""The coordinator's database: models, Alembic migrations and `fedtune db` administration."""

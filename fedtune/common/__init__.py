"""What every fedtune package may import, and what imports nothing of fedtune: the one error
base, key files written safely, and how a database is opened and its times are stored."""

"""What travels between nodes and coordinator: message contents, secure-aggregation
replies and masks, and the run bundle both sides check before they install it."""

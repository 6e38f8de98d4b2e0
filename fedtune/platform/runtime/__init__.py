"""Finding and running Flower's commands and ending process trees."""

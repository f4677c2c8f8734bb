"""Router comparison on simulated fleets (bench/compare_routers.py): fleets, runs, tables, plots."""

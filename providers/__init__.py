"""Providers: where workers run (local machine, simulated cloud, AWS, GCP, Azure, Lambda Cloud)."""

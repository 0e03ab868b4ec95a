"""What the serving benchmarks share: the OpenAI server's life cycle and log, a
streaming load client and its metrics, and the four-domain task workload."""

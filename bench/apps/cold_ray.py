"""Cold start, Ray: a fresh process from launch to the first result of a trivial task (local, 2 CPUs)."""

import ray


@ray.remote
def one(x):
    return x


if __name__ == "__main__":
    ray.init(num_cpus=2)
    print(f"FIRST_RESULT {ray.get(one.remote(1))}", flush=True)
    ray.shutdown()

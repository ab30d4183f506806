"""Cold start, concurrent.futures.ProcessPoolExecutor(2): a fresh process from launch to the first result."""

from concurrent.futures import ProcessPoolExecutor


def one(x):
    return x


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as ex:
        print(f"FIRST_RESULT {ex.submit(one, 1).result()}", flush=True)

"""Cold start, multiprocessing.Pool(2): a fresh process from launch to the first result."""

import multiprocessing


def one(x):
    return x


if __name__ == "__main__":
    with multiprocessing.Pool(2) as pool:
        print(f"FIRST_RESULT {pool.apply(one, (1,))}", flush=True)

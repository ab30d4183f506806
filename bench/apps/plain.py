"""The same functions as plain top-level Python, for multiprocessing.Pool and ProcessPoolExecutor."""

import time


def noop(x):
    return x


def sleep10(x):
    time.sleep(0.01)
    return x


def echo(b):
    return b

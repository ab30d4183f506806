"""`python autoscaler_calls.py`: Function.update_autoscaler / Obj.update_autoscaler and
Function.get_current_stats on a deployed app, in the style of Modal's "Scaling out" guide."""

import time

import cloudmodal
from cloudmodal.exception import InvalidError

hello = cloudmodal.Function.from_name("conformance-autoscaler", "hello")
s0 = hello.update_autoscaler()  # nothing to change: the settings in force
print("initial", s0.min_containers, s0.max_containers, s0.buffer_containers, s0.scaledown_window)
print("call", hello.remote("you"))
stats = hello.get_current_stats()
print("stats", stats.backlog, stats.num_total_runners >= 1)
settings = hello.update_autoscaler(min_containers=2, max_containers=3, scaledown_window=30)
print(
    "updated",
    settings.min_containers,
    settings.max_containers,
    settings.buffer_containers,
    settings.scaledown_window,
)
# the control plane starts the warm containers asked for
for _ in range(600):
    if hello.get_current_stats().num_total_runners >= 2:
        break
    time.sleep(0.2)
print("warm", hello.get_current_stats().num_total_runners >= 2)
kept = hello.update_autoscaler(buffer_containers=1)  # the others keep their values
print("kept", kept.min_containers, kept.max_containers, kept.buffer_containers, kept.scaledown_window)
try:
    hello.update_autoscaler(min_containers=5)  # above max_containers (3)
except InvalidError as e:
    print("refused", "max_containers" in str(e))
try:
    hello.update_autoscaler(scaledown_window=1)
except InvalidError as e:
    print("refused window", "between 2 and 3600" in str(e))
end = hello.update_autoscaler(min_containers=0, buffer_containers=0)
print("final", end.min_containers, end.max_containers, end.buffer_containers, end.scaledown_window)
greeter = cloudmodal.Cls.from_name("conformance-autoscaler", "Greeter")(greeting="hey")
print("cls", greeter.greet.remote("there"), greeter.update_autoscaler(max_containers=1).max_containers)

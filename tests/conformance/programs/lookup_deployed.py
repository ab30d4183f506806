"""Finds the app `cloudmodal deploy deployed.py` made: App.lookup and Function.from_name."""

import cloudmodal

app = cloudmodal.App.lookup("conformance-deployed")
print("lookup:", app.name, app.app_id)
triple = cloudmodal.Function.from_name("conformance-deployed", "triple")
print("triple", triple.remote(5))
print("spawned", triple.spawn(7).get(timeout=60))

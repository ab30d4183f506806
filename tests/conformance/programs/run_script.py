"""`python run_script.py`: an app run by the program itself, in the style of Modal's guide
("Apps, Functions, and entrypoints" / "enable_output"), with Image.imports for an image-only package and the
per-input context (is_local, current_function_call_id, current_input_id)."""

import cloudmodal

image = cloudmodal.Image.debian_slim()

with image.imports():
    import remote_only  # in the image only: here the ImportError is swallowed

app = cloudmodal.App("conformance-run-script", image=image)


@app.function()
def where(x: int) -> dict:
    print(f"worker says {x}")
    return {
        "x": x,
        "is_local": cloudmodal.is_local(),
        "call_id": cloudmodal.current_function_call_id(),
        "input_id": cloudmodal.current_input_id(),
        "remote_only": remote_only.VALUE,
    }


if __name__ == "__main__":
    print("here: is_local", cloudmodal.is_local())
    print("here: ids", cloudmodal.current_function_call_id(), cloudmodal.current_input_id())
    print("here: remote_only imported", "remote_only" in globals())
    print("app_id before run", app.app_id)
    with cloudmodal.enable_output():
        with app.run():
            print("app_id in run", (app.app_id or "")[:3])
            one = where.remote(1)
            print("remote: is_local", one["is_local"], "remote_only", one["remote_only"])
            print("remote: call id", one["call_id"][:3], "input id set", bool(one["input_id"]))
            many = list(where.map([2, 3, 4]))
            print(
                "map: one call", len({r["call_id"] for r in many}) == 1, many[0]["call_id"] != one["call_id"]
            )
            print("map: distinct inputs", len({r["input_id"] for r in many}) == 3)
            spawned = where.spawn(5)
            print("spawn: call id matches", spawned.get(timeout=60)["call_id"] == spawned.object_id)
    print("app_id after run", app.app_id)

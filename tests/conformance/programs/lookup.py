"""`python lookup.py`: App.lookup(name, create_if_missing=...) as Modal documents it (the app Sandboxes are
created in), run against the control plane of a running app."""

import cloudmodal
from cloudmodal.exception import NotFoundError

app = cloudmodal.App("conformance-lookup")


@app.function()
def ping() -> str:
    return "pong"


if __name__ == "__main__":
    with app.run():
        try:
            cloudmodal.App.lookup("conformance-missing")
        except NotFoundError:
            print("missing: NotFoundError")
        try:
            cloudmodal.App.lookup("conformance-lookup")  # the running app is ephemeral: not deployed
        except NotFoundError:
            print("ephemeral: NotFoundError")
        made = cloudmodal.App.lookup("conformance-made", create_if_missing=True)
        again = cloudmodal.App.lookup("conformance-made", create_if_missing=True)
        by_id = cloudmodal.App.lookup(made.app_id)
        print("made:", made.name, made.app_id[:3], again.app_id == made.app_id, by_id.name)
        print("ping", ping.remote())

import sys

if __name__ == "__main__":
    if "--standby" in sys.argv[1:]:
        # Warm standby (see providers/local.py): import the runtime now, become a worker when told.
        import json
        import os

        from cloudmodal.client.transport import warm_up
        from cloudmodal.settings import settings
        from cloudmodal.worker.runtime import TOKEN_ENV, main

        warm_up()
        try:
            settings()  # pydantic-settings loads now, not after the job arrives
        except ValueError:
            pass  # a bad variable is reported when the worker reads it
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)
        env = json.loads(line)
        # The token goes straight to the runtime: it never enters this process's environment, so neither
        # the user's code nor anything it starts inherits it.
        token = env.pop(TOKEN_ENV, None)
        os.environ.clear()
        os.environ.update(env)
        raise SystemExit(main(token=token))
    from cloudmodal.worker.runtime import main

    raise SystemExit(main())

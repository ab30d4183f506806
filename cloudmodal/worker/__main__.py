import sys

if __name__ == "__main__":
    if "--standby" in sys.argv[1:]:
        # Warm standby (see providers/local.py): import the runtime now, become a worker when told.
        import json
        import os

        from cloudmodal.client.transport import warm_up
        from cloudmodal.worker.runtime import main

        warm_up()
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)
        env = json.loads(line)
        os.environ.clear()
        os.environ.update(env)
        raise SystemExit(main())
    from cloudmodal.worker.runtime import main

    raise SystemExit(main())

#!/usr/bin/env python3
"""Checks that a running ringvm answers as resources/api/ringvm.yaml says.

    python3 resources/api/conformance.py RINGVM_BINARY [extra schemathesis args]

Starts `ringvm --api-sock` (waiting for configuration), bridges a loopback
TCP port to its Unix socket (schemathesis speaks TCP), and runs schemathesis'
stateless phases (examples, coverage, fuzzing) against it with a bounded
number of examples and a time budget. It fails on any 5xx, on a status,
content type or body the description does not allow, and on a request the
description forbids that ringvm accepts. At the end ringvm must still be
running and answering.

Generated requests name random files: ringvm runs in an empty scratch
directory and, when this runs as root, as the unprivileged user nobody, so
the logger and metrics files it is told to create land nowhere that
matters. No request can boot a guest: no generated path is a kernel.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "ringvm.yaml")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)
MAX_EXAMPLES = os.environ.get("RINGVM_SCHEMATHESIS_EXAMPLES", "15")
MAX_TIME_S = 75  # schemathesis' own budget
HARD_LIMIT_S = 120  # then it is killed


def bridge(listener, sock_path, stop):
    """Forwards each TCP connection to a new connection on the socket."""

    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except socket.timeout:
            continue
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(sock_path)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    ringvm = os.path.abspath(sys.argv[1])
    extra = sys.argv[2:]
    scratch = tempfile.mkdtemp(prefix="ringvm-conformance-")
    os.chmod(scratch, 0o777)
    sock_path = os.path.join(scratch, "api.sock")
    cmd = [ringvm, "--api-sock", sock_path, "--id", "conformance"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    log = open(os.path.join(scratch, "ringvm.log"), "wb")
    vmm = subprocess.Popen(cmd, cwd=scratch, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock_path):
            if vmm.poll() is not None or time.monotonic() > deadline:
                sys.exit("ringvm did not create its API socket")
            time.sleep(0.05)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        threading.Thread(target=bridge, args=(listener, sock_path, stop), daemon=True).start()
        url = f"http://127.0.0.1:{port}"

        # First prove the harness can fail: against a copy of the
        # description that forbids the state a fresh ringvm reports, GET /
        # must be flagged.
        wrong = os.path.join(scratch, "wrong.yaml")
        with open(SPEC) as f:
            text = f.read()
        mutated = text.replace('enum: ["Not started", "Running", "Paused"]', 'enum: ["Running"]')
        assert mutated != text, "the mutation no longer applies to ringvm.yaml"
        with open(wrong, "w") as f:
            f.write(mutated)
        probe = [
            sys.executable, "-m", "schemathesis.cli", "run", wrong, "--url", url,
            "--checks", "response_schema_conformance", "--phases", "examples,coverage",
            "--include-path", "/", "--include-method", "GET", "--max-examples", "1",
        ]
        caught = subprocess.run(probe, cwd=scratch, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=60).returncode
        if caught == 0:
            print("[conformance] FAILED: a wrong description passed; the check proves nothing")
            return 1
        print("[conformance] a deliberately wrong description is caught", flush=True)

        st = [
            sys.executable, "-m", "schemathesis.cli", "run", SPEC,
            "--url", url,
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", MAX_EXAMPLES,
            "--max-time", str(MAX_TIME_S),
            "--workers", "2",
            "--request-timeout", "10",
            "--suppress-health-check", "all",
            "--no-shrink",
            "--seed", os.environ.get("RINGVM_SCHEMATHESIS_SEED", "1"),
        ] + extra
        print("[conformance]", " ".join(st), flush=True)
        try:
            rc = subprocess.run(st, cwd=scratch, timeout=HARD_LIMIT_S).returncode
        except subprocess.TimeoutExpired:
            print(f"[conformance] schemathesis ran past {HARD_LIMIT_S} s", flush=True)
            rc = 1

        # The VMM must have survived all of it and still answer.
        alive = vmm.poll() is None
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as r:
                answering = r.status == 200
        except OSError:
            answering = False
        if not (alive and answering):
            print(f"[conformance] ringvm died or stopped answering (exit {vmm.poll()})", flush=True)
            rc = rc or 1
        print(f"[conformance] {'passed' if rc == 0 else 'FAILED'}", flush=True)
        return rc
    finally:
        stop.set()
        if vmm.poll() is None:
            vmm.send_signal(signal.SIGTERM)
            try:
                vmm.wait(timeout=10)
            except subprocess.TimeoutExpired:
                vmm.kill()
                vmm.wait()
        log.close()
        if os.environ.get("RINGVM_CONFORMANCE_KEEP"):
            print(f"[conformance] scratch kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

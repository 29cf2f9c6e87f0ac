#!/usr/bin/env python3
"""A small testenv-client written with PyPI gear, for the interoperability tests.

It speaks the TripleO CI testenv protocol as the original client did: register
`callback_<jobnum>`, submit `lockenv` with the request JSON (all values strings), and when the
worker calls back, write the TE data to a temp file, run COMMAND with TE_DATAFILE pointing at
it, and complete the callback job. Exits with COMMAND's status (128+signal if it was killed);
2 if the worker had no environment; 3 if the worker released the TE while COMMAND still ran
(COMMAND is killed then).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid

import gear

from te_common import WaitingClient, add_servers, text

NO_ENV_MARKERS = ("Couldn't retrieve env",)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('command', nargs='+')
    p.add_argument('-b', '--geard', default='127.0.0.1:4730')
    p.add_argument('-n', '--jobnum', default=uuid.uuid4().hex)
    p.add_argument('-t', '--timeout', default='10800')
    p.add_argument('--envsize', default='2')
    p.add_argument('--ucinstance', default='')
    p.add_argument('--create-undercloud', action='store_true')
    p.add_argument('--ssh-key', default='')
    p.add_argument('--net-iso', default='multi-nic')
    opts = p.parse_args()

    callback = 'callback_' + opts.jobnum
    state = {'rv': None, 'proc': None}

    worker = gear.Worker('testenv-client-%s' % opts.jobnum)
    add_servers(worker, opts.geard)
    worker.waitForServer()
    worker.registerFunction(callback)

    def serve_callback():
        try:
            job = worker.getJob()
        except gear.InterruptedError:
            return
        data = text(job.arguments)
        if any(m in data for m in NO_ENV_MARKERS) or data.startswith('Failed creating OVB stack'):
            print(data, file=sys.stderr, flush=True)
            state['rv'] = 2
            job.sendWorkComplete(b'')
            return
        with tempfile.NamedTemporaryFile('w', prefix='te-py-') as fp:
            fp.write(data)
            fp.flush()
            env = dict(os.environ, TE_DATAFILE=fp.name)
            proc = subprocess.Popen(opts.command, env=env)
            state['proc'] = proc
            rc = proc.wait()
        state['rv'] = 128 - rc if rc < 0 else rc
        job.sendWorkComplete(b'')

    runner = threading.Thread(target=serve_callback, daemon=True)
    runner.start()

    client = WaitingClient('testenv-client-%s-lock' % opts.jobnum)
    add_servers(client, opts.geard)
    client.waitForServer()
    request = {
        'callback_name': callback,
        'timeout': opts.timeout,
        'envsize': opts.envsize,
        'ucinstance': opts.ucinstance,
        'create_undercloud': 'true' if opts.create_undercloud else '',
        'ssh_key': opts.ssh_key,
        'net_iso': opts.net_iso,
        'job_identifier': '%s: %s' % (os.environ.get('ZUUL_CHANGE', 'No change'),
                                      os.environ.get('TOCI_JOBTYPE', '')),
    }
    lock = gear.Job('lockenv', json.dumps(request).encode())
    client.submitJob(lock)
    client.ended.wait()
    if lock.failure:
        print('lockenv failed', file=sys.stderr, flush=True)
    # The callback is answered before the worker completes lockenv; give the thread a moment.
    runner.join(2)
    rv = state['rv']
    if rv is None:
        print('the testenv worker released the environment while the command ran; killing it',
              file=sys.stderr, flush=True)
        if state['proc'] is not None:
            state['proc'].kill()
        rv = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rv)


if __name__ == '__main__':
    main()
